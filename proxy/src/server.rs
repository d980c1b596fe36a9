//! The client-facing listener: accept, optional TLS, HTTP/2, and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::accept::AcceptBackoff;
use crate::admin::Admin;
use crate::auth::{AuthSessions, ClientInfo};
use crate::batched_writes::BatchedWrites;
use crate::config::Config;
use crate::forward::Forwarder;
use crate::legacy_authority::AuthorityRepair;
use crate::metrics::{ClosedBecause, Metrics};
use crate::upstream::{Upstream, CONNECTION_WINDOW, STREAM_WINDOW};

/// Longest wait for a client's answer to a ping (gRPC's own keep-alive timeout).
const MAX_PING_ANSWER_TIME: Duration = Duration::from_secs(20);

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
        &config.limits,
        stop.clone(),
    );
    if let Some(admin_listener) = admin_listener {
        let admin = Arc::new(Admin { upstream: Arc::clone(&upstream), metrics: Arc::clone(&metrics) });
        tokio::spawn(admin.serve(admin_listener, stop.clone()));
    }

    let http2 = http2_server(&config);
    let connections = tokio_util::task::TaskTracker::new();
    let drain = CancellationToken::new();
    tracing::info!(
        listen = %config.listen_addr,
        tls = listener_tls.is_some(),
        endpoints = ?config.endpoints.iter().map(|e| e.url()).collect::<Vec<_>>(),
        metrics = ?config.metrics_addr,
        "etcd-compat-proxy started"
    );

    tokio::pin!(shutdown);
    let mut accept_errors = AcceptBackoff::new("--listen-addr");
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    accept_errors.succeeded();
                    accepted
                }
                Err(error) => {
                    accept_errors.failed(&error).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let client = ClientConnection {
            deadline: tokio::time::Instant::now() + config.limits.handshake_timeout,
            peer,
            // Read per connection, so a reloaded certificate is used from the next handshake on.
            tls: listener_tls.as_ref().map(|tls| tokio_rustls::TlsAcceptor::from(tls.current())),
            forwarder: Arc::clone(&forwarder),
            metrics: Arc::clone(&metrics),
            max_header_list: config.limits.max_header_list,
        };
        connections.spawn(client.serve(stream, http2.clone(), drain.clone()));
    }

    tracing::info!(grace = ?config.shutdown_grace, "shutting down: no new connections; ending streams, letting unary calls finish");
    drop(listener);
    stop.cancel();
    drain.cancel();
    connections.close();
    if tokio::time::timeout(config.shutdown_grace, connections.wait()).await.is_err() {
        tracing::warn!("calls still running after the shutdown grace period were cut");
    }
    Ok(())
}

/// Any client byte stream (plain TCP or TLS), so that one connection type serves both.
trait ClientStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ClientStream for T {}

/// One accepted client connection, from the TLS handshake to its last call.
struct ClientConnection {
    /// The TLS handshake, the HTTP/2 preface and the client's SETTINGS must arrive by then.
    deadline: tokio::time::Instant,
    peer: std::net::SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    max_header_list: u32,
}

impl ClientConnection {
    async fn serve(self, stream: TcpStream, http2: Http2Server, drain: CancellationToken) {
        let _open = self.metrics.client_connection_opened();
        let peer = self.peer;
        let mut client = ClientInfo { addr: Some(peer.ip()), common_name: None };
        let io: Box<dyn ClientStream> = match &self.tls {
            None => Box::new(stream),
            Some(acceptor) => match tokio::time::timeout_at(self.deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    client.common_name = peer_common_name(&tls_stream);
                    Box::new(tls_stream)
                }
                Ok(Err(error)) => {
                    tracing::info!(%peer, %error, "client TLS handshake failed");
                    return;
                }
                Err(_) => {
                    self.metrics.client_connection_closed(ClosedBecause::Handshake);
                    tracing::debug!(%peer, "client did not complete its TLS handshake in time (--handshake-timeout); connection closed");
                    return;
                }
            },
        };
        // The listener's pieces, innermost first: the client's bytes, the repair of header
        // blocks that old clients get wrong (which also sees the preface and SETTINGS arrive),
        // batched small writes, then the HTTP/2 server.
        let handshake = Arc::new(AtomicBool::new(false));
        let repaired =
            AuthorityRepair::new(io, Arc::clone(&self.metrics), self.max_header_list, Arc::clone(&handshake));
        let io = TokioIo::new(BatchedWrites(repaired));
        // Auth sessions need to know who is calling: the address (to slow down password
        // guessing) and, for mTLS clients, the certificate's CN (to pick a configured identity).
        let forwarder = self.forwarder;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(client.clone());
            Arc::clone(&forwarder).serve(request)
        });
        let connection = http2.serve_connection(io, service);
        tokio::pin!(connection);
        let handshake_timer = tokio::time::sleep_until(self.deadline);
        tokio::pin!(handshake_timer);
        let mut awaiting_handshake = true;
        let mut draining = false;
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break result,
                _ = &mut handshake_timer, if awaiting_handshake => {
                    if !handshake.load(Relaxed) {
                        self.metrics.client_connection_closed(ClosedBecause::Handshake);
                        tracing::debug!(%peer, "client sent no HTTP/2 preface and SETTINGS in time (--handshake-timeout); connection closed");
                        return;
                    }
                    awaiting_handshake = false;
                }
                _ = drain.cancelled(), if !draining => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        };
        if let Err(error) = result {
            if error.is_timeout() {
                self.metrics.client_connection_closed(ClosedBecause::NoPingAnswer);
                tracing::debug!(%peer, "client did not answer a ping after being silent (--idle-connection-timeout); connection closed");
            } else {
                tracing::debug!(%peer, %error, "client connection ended with an error");
            }
        }
    }
}

/// The CN of the client certificate a TLS client presented, if any.
fn peer_common_name(stream: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<String> {
    let certificate = stream.get_ref().1.peer_certificates()?.first()?;
    etcd_compat_certs::inspect(certificate).ok()?.common_name
}

/// The HTTP/2 server every client connection is served with.
type Http2Server = hyper::server::conn::http2::Builder<TokioExecutor>;

fn http2_server(config: &Config) -> Http2Server {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(1024 * 1024)
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_header_list_size(config.limits.max_header_list)
        // etcd sends no Date header; adding one would make responses differ from direct ones.
        .auto_date_header(false)
        // Large responses leave as fast as the client reads them, not in 400 KiB steps.
        .max_send_buf_size(1024 * 1024);
    // A silent connection is pinged: clients that answer stay (old clients may not reconnect
    // gracefully), half-open ones and peers that never speak HTTP/2 are closed.
    if let Some(idle) = config.limits.idle_connection_timeout {
        builder.keep_alive_interval(idle).keep_alive_timeout(idle.min(MAX_PING_ANSWER_TIME));
    }
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
