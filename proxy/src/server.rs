//! Startup and shutdown: the proxy assembled from its parts, in the order a call meets them, then
//! the accept loop, then the drain.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, DoctorEndpoint, Metrics};
use crate::auth::AuthSessions;
use crate::call::Forwarder;
use crate::cluster_access::ClusterAccess;
use crate::config::Config;
use crate::listener::accept::AcceptBackoff;
use crate::listener::{http2_server, ClientConnection};
use crate::migrate::Migration;
use crate::tls::{CertRegistry, Reloadable, SharedUpstreamFiles, Side, TlsError};
use crate::upstream::Cluster;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}; is another process using the port?")]
    Bind { addr: std::net::SocketAddr, what: &'static str, source: std::io::Error },
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Auth sessions could not be set up.
    #[error("{0}")]
    Auth(String),
}

/// Runs the proxy until `shutdown` resolves, then drains: stops accepting, ends streams with a
/// status, lets unary calls finish for up to `shutdown_grace`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    for ignored in &config.ignored_flags {
        tracing::warn!(flag = ignored.flag, why = ignored.why, "grpc-proxy flag accepted but has no effect");
    }
    // Counters first: every part below reports to them, certificates included.
    let metrics = Arc::new(Metrics::default());
    let certificates = Arc::clone(&metrics.certificates);
    certificates.set_policy(config.cert_expiry);
    // The listener's TLS, built before binding so that bad material stops the start, and kept
    // replaceable so that renewed certificates are served without a restart.
    let listener_tls = match &config.listener_tls {
        Some(files) => {
            let built = crate::tls::build_listener(files, &certificates.legacy_counter())?;
            certificates.publish(Side::Listener, built.certs);
            Some(Arc::new(Reloadable::new(built.config)))
        }
        None => None,
    };
    // Both ports bound before anything runs: a port in use fails the start, not a later call.
    let listener = bind(config.listen_addr, "--listen-addr", config.reuse_port)?;
    let admin_listener = match config.metrics_addr {
        Some(addr) => Some(bind(addr, "--metrics-addr", config.reuse_port)?),
        None => None,
    };

    let stop = CancellationToken::new();
    // The cluster behind the proxy: members, their connections, health and the cluster view.
    let cluster = Cluster::new(&config, metrics.explainer.clone())?;
    // TLS files watched on both sides: a renewed certificate or CA is used without a restart.
    let upstream_files: SharedUpstreamFiles = Arc::new(std::sync::RwLock::new(config.upstream_tls.clone()));
    watch_tls_files(&config, listener_tls.clone(), &cluster, &upstream_files, &certificates, stop.clone())?;
    // Health checks and the view's refresh keep requests away from members that cannot serve.
    cluster.spawn_health_checks(config.health_interval, stop.clone());
    cluster.spawn_view_refresh(stop.clone());
    // Auth sessions: with --session-key-file their tokens open them in any replica and after a
    // restart; the key file is watched like the TLS files.
    let auth = Arc::new(AuthSessions::new(config.auth.clone()).map_err(RunError::Auth)?);
    let _ = metrics.auth_sessions.set(Arc::new(SessionGauge(Arc::clone(&auth))));
    tokio::spawn(expire_idle_sessions(Arc::clone(&auth), stop.clone()));
    if let Some((path, _)) = &config.auth.session_keys {
        tokio::spawn(watch_session_keys(Arc::clone(&auth), path.clone(), config.cert_reload_interval, stop.clone()));
    }
    // A migration to a new cluster, idle until `etcd-compat-proxy migrate` starts one.
    let migration = Migration::new(ClusterAccess::source_of(&config), Arc::clone(&cluster), upstream_files);
    // The request path, shared by every client connection.
    let forwarder = Forwarder::new(
        Arc::clone(&cluster),
        Arc::clone(&metrics),
        Arc::clone(&auth),
        Arc::clone(&migration),
        &config,
        stop.clone(),
    );
    // The admin server answers `/health`, `/ready`, `/metrics` and the migration's calls on its
    // own port, and keeps answering while the proxy drains (so that `/ready` can say so).
    let draining = Arc::new(AtomicBool::new(false));
    let admin_stop = CancellationToken::new();
    if let Some(admin_listener) = admin_listener {
        let admin = Arc::new(Admin {
            upstream: Arc::clone(&cluster),
            metrics: Arc::clone(&metrics),
            migration,
            token: config.admin_token.clone(),
            draining: Arc::clone(&draining),
            doctor: DoctorEndpoint::new(
                crate::cluster_access::ClusterAccess::source_of(&config),
                crate::doctor::Settings::of(&config),
                Arc::clone(&certificates),
            ),
        });
        tokio::spawn(serve_admin(admin, admin_listener, admin_stop.clone()));
    }
    // Under systemd (`Type=notify`) the unit is started once the proxy can serve.
    tokio::spawn(notify_when_ready(Arc::clone(&cluster), stop.clone()));

    let http2 = http2_server(&config);
    // Connections are tracked so that shutdown can wait for their calls to finish.
    let connections = tokio_util::task::TaskTracker::new();
    let drain = CancellationToken::new();
    tracing::info!(
        listen = %config.listen_addr,
        tls = listener_tls.is_some(),
        endpoints = ?config.endpoints.iter().map(|e| e.url()).collect::<Vec<_>>(),
        metrics = ?config.metrics_addr,
        "etcd-compat-proxy started"
    );

    let serve_client = |stream: tokio::net::TcpStream, peer| {
        let _ = stream.set_nodelay(true);
        let client = ClientConnection {
            deadline: tokio::time::Instant::now() + config.limits.handshake_timeout,
            peer,
            // Read per connection, so a reloaded certificate is used from the next handshake on.
            tls: listener_tls.as_ref().map(|tls| tokio_rustls::TlsAcceptor::from(tls.current())),
            forwarder: Arc::clone(&forwarder),
            metrics: Arc::clone(&metrics),
            max_header_list: config.limits.max_header_list,
            unread_response_timeout: config.limits.unread_response_timeout,
        };
        connections.spawn(client.serve(stream, http2.clone(), drain.clone()));
    };
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
        serve_client(stream, peer);
    }

    tracing::info!(grace = ?config.shutdown_grace, "shutting down: no new connections; ending streams, letting unary calls finish");
    draining.store(true, Relaxed);
    crate::service_manager::notify("STOPPING=1\nSTATUS=draining");
    // Connections the kernel already queued for this listener would be reset when it closes:
    // they are taken and drained like the others (with --reuse-port, new ones go to the process
    // that took over). Accepted with the socket's own calls until it has none left, since the
    // runtime may not have seen the latest arrivals yet. At most a backlog's worth: a flood of
    // new connections must not keep the drain from starting.
    if let Ok(listener) = listener.into_std() {
        for (stream, peer) in std::iter::from_fn(|| listener.accept().ok()).take(LISTEN_BACKLOG as usize) {
            match stream.set_nonblocking(true).and_then(|()| tokio::net::TcpStream::from_std(stream)) {
                Ok(stream) => serve_client(stream, peer),
                Err(error) => {
                    tracing::debug!(%peer, %error, "a connection queued before the drain could not be served")
                }
            }
        }
    }
    stop.cancel();
    drain.cancel();
    connections.close();
    if tokio::time::timeout(config.shutdown_grace, connections.wait()).await.is_err() {
        tracing::warn!("calls still running after the shutdown grace period were cut");
    }
    admin_stop.cancel();
    Ok(())
}

/// Binds `addr`; with `reuse_port`, as one of a group of sockets sharing it (SO_REUSEPORT), so
/// that another proxy process can bind it too.
fn bind(addr: std::net::SocketAddr, what: &'static str, reuse_port: bool) -> Result<TcpListener, RunError> {
    let listen = || {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        if reuse_port {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| RunError::Bind { addr, what, source })
}

/// Connections the kernel may queue before the proxy accepts them (tokio's default).
const LISTEN_BACKLOG: u32 = 1024;

/// Tells systemd `READY=1` once a member that serves clients is healthy.
async fn notify_when_ready(cluster: Arc<Cluster>, stop: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => if cluster.any_healthy() {
                crate::service_manager::notify("READY=1\nSTATUS=serving");
                return;
            },
        }
    }
}

/// Accepts admin connections until `stop` is cancelled.
async fn serve_admin(admin: Arc<Admin>, listener: TcpListener, stop: CancellationToken) {
    let mut accept_errors = AcceptBackoff::new("--metrics-addr");
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    accept_errors.succeeded();
                    stream
                }
                Err(error) => {
                    accept_errors.failed(&error).await;
                    continue;
                }
            },
        };
        tokio::spawn(Arc::clone(&admin).serve_connection(stream));
    }
}

/// Publishes the upstream certificates and starts watching both sides' files (and SIGHUP):
/// the listener's material is replaced for the next handshake; the upstream material is tried
/// on new connections first and adopted only if a member accepts it.
fn watch_tls_files(
    config: &Config,
    listener: Option<Arc<Reloadable<rustls::ServerConfig>>>,
    cluster: &Arc<Cluster>,
    upstream_files: &SharedUpstreamFiles,
    registry: &Arc<CertRegistry>,
    stop: CancellationToken,
) -> Result<(), TlsError> {
    use crate::tls::reload::WatchedSide;
    let mut sides = Vec::new();
    if let (Some(files), Some(listener)) = (config.listener_tls.clone(), listener) {
        let legacy_counter = registry.legacy_counter();
        sides.push(WatchedSide {
            side: Side::Listener,
            paths: Box::new({
                let files = files.clone();
                move || files.paths()
            }),
            apply: Box::new(move || {
                let result = crate::tls::build_listener(&files, &legacy_counter).map(|built| {
                    listener.replace(built.config);
                    built.certs
                });
                Box::pin(async move { result.map_err(|error| error.to_string()) })
            }),
        });
    }
    if let Some(files) = config.upstream_tls.as_ref().filter(|_| cluster.tls_config().is_some()) {
        registry.publish(Side::Upstream, crate::tls::build_upstream(files)?.certs);
    }
    // Always watched: a migration's cutover may bring TLS files to a plaintext upstream.
    let watched = Arc::clone(upstream_files);
    let pool = Arc::clone(cluster);
    let counts = Arc::clone(registry);
    sides.push(WatchedSide {
        side: Side::Upstream,
        paths: Box::new(move || read_shared(&watched).map(|files| files.paths()).unwrap_or_default()),
        apply: Box::new({
            let upstream_files = Arc::clone(upstream_files);
            move || {
                let built = read_shared(&upstream_files).map(|files| crate::tls::build_upstream(&files));
                let (pool, counts) = (Arc::clone(&pool), Arc::clone(&counts));
                Box::pin(async move {
                    let Some(built) = built else { return Ok(Vec::new()) };
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
            }
        }),
    });
    crate::tls::reload::spawn(sides, Arc::clone(registry), config.cert_reload_interval, stop);
    Ok(())
}

fn read_shared(files: &SharedUpstreamFiles) -> Option<crate::tls::UpstreamTlsFiles> {
    match files.read() {
        Ok(files) => files.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// Forgets idle proxy-token sessions once a minute.
/// The auth sessions as a gauge on `/metrics` (here, because `auth` sits below `admin`).
struct SessionGauge(Arc<AuthSessions>);

impl crate::admin::RenderMetrics for SessionGauge {
    fn render(&self, out: &mut String) {
        out.push_str("# HELP etcd_compat_proxy_auth_sessions Auth sessions held in memory.\n");
        out.push_str("# TYPE etcd_compat_proxy_auth_sessions gauge\n");
        out.push_str(&format!("etcd_compat_proxy_auth_sessions {}\n", self.0.session_count()));
    }
}

async fn expire_idle_sessions(auth: Arc<AuthSessions>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => auth.expire_idle(),
        }
    }
}

/// Reloads `--session-key-file` when it changes; a file that no longer parses keeps the keys in
/// use (and says why), so that a half-written file never locks clients out.
async fn watch_session_keys(
    auth: Arc<AuthSessions>,
    path: std::path::PathBuf,
    every: Duration,
    stop: CancellationToken,
) {
    let stamp = |path: &std::path::Path| std::fs::metadata(path).ok().map(|m| (m.modified().ok(), m.len()));
    let mut seen = stamp(&path);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let parsed = std::fs::read_to_string(&path)
            .map_err(|error| error.to_string())
            .and_then(|text| crate::auth::parse_key_file(&text).map_err(|e| e.to_string()));
        match parsed {
            Ok(keys) if auth.replace_keys(&keys) => {
                tracing::info!(path = %path.display(), keys = keys.len(), "session keys reloaded; the first seals new tokens");
            }
            Ok(_) => {
                tracing::error!(path = %path.display(), "the crypto provider refused the reloaded session keys; the previous ones stay in use")
            }
            Err(problem) => {
                tracing::error!(path = %path.display(), %problem, "the session key file was not reloaded; the previous keys stay in use")
            }
        }
    }
}
