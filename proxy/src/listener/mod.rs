//! Client connections: from the accepted socket to the HTTP/2 server serving its calls, with the
//! guards a connection passes first.
//!
//! In order, for each connection: the TLS handshake (if the listener has TLS) and the HTTP/2
//! preface and SETTINGS must complete within `--handshake-timeout`; the client's bytes pass the
//! [`authority_repair`] of header blocks old clients get wrong, and small frames are written in
//! batches; then the HTTP/2 server serves its calls with the [`crate::call::Forwarder`], pinging
//! a connection that goes silent. [`accept`] is what the listeners do when accepting fails.
//! Sits on top: it hands calls to the request path and nothing below depends on it.

pub mod accept;
pub mod authority_repair;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::admin::{ClosedBecause, Metrics};
use crate::auth::ClientInfo;
use crate::call::Forwarder;
use crate::config::Config;
use crate::transport::{
    BatchedWrites, UnreadAnswers, CLIENT_CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_SEND_BUFFER, STREAM_WINDOW,
};

use authority_repair::AuthorityRepair;

/// Longest wait for a client's answer to a ping (gRPC's own keep-alive timeout).
const MAX_PING_ANSWER_TIME: Duration = Duration::from_secs(20);

/// Failed client TLS handshakes are logged at most this often: a scanner, or a fleet that does
/// not trust the certificate, would otherwise write a line per connection.
const TLS_FAILURE_LOG_EVERY: Duration = Duration::from_secs(1);
static TLS_FAILURES: FailureLog = FailureLog::new();

/// Failures counted between the lines that log them.
struct FailureLog {
    unlogged: AtomicU64,
    last_logged: Mutex<Option<tokio::time::Instant>>,
}

impl FailureLog {
    const fn new() -> Self {
        FailureLog { unlogged: AtomicU64::new(0), last_logged: Mutex::new(None) }
    }

    /// Counts a failure; when a line is due, how many it reports (this one and those not logged).
    fn failed(&self) -> Option<u64> {
        self.unlogged.fetch_add(1, Relaxed);
        let mut last = self.last_logged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < TLS_FAILURE_LOG_EVERY) {
            return None;
        }
        *last = Some(tokio::time::Instant::now());
        Some(self.unlogged.swap(0, Relaxed))
    }
}

/// Any client byte stream (plain TCP or TLS), so that one connection type serves both.
trait ClientStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ClientStream for T {}

/// One accepted client connection, from the TLS handshake to its last call.
pub struct ClientConnection {
    /// The TLS handshake, the HTTP/2 preface and the client's SETTINGS must arrive by then.
    pub deadline: tokio::time::Instant,
    /// Where the client connects from.
    pub peer: std::net::SocketAddr,
    /// The listener's TLS, as it was when the connection was accepted.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Serves the connection's calls.
    pub forwarder: Arc<Forwarder>,
    /// Where connection events are counted.
    pub metrics: Arc<Metrics>,
    /// `--max-header-list-bytes`.
    pub max_header_list: u32,
    /// `--unread-response-timeout`.
    pub unread_response_timeout: std::time::Duration,
}

impl ClientConnection {
    /// Serves the connection until it ends; `drain` asks it to finish its calls and close.
    pub async fn serve(self, stream: TcpStream, http2: Http2Server, drain: CancellationToken) {
        let _open = self.metrics.client_connection_opened();
        let peer = self.peer;
        // Cancelled to drain the connection, or to close it at once when it takes nothing of
        // an answer (see `transport::unread`): one branch below serves both.
        let closing = drain.child_token();
        let unread = UnreadAnswers::new(self.unread_response_timeout, closing.clone());
        let mut client = ClientInfo { addr: Some(peer.ip()), common_name: None, unread: Some(unread.clone()) };
        let io: Box<dyn ClientStream> = match &self.tls {
            None => Box::new(stream),
            Some(acceptor) => match tokio::time::timeout_at(self.deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    client.common_name = peer_common_name(&tls_stream);
                    Box::new(tls_stream)
                }
                Ok(Err(error)) => {
                    self.metrics.client_connection_closed(ClosedBecause::TlsFailed);
                    if let Some(failures) = TLS_FAILURES.failed() {
                        tracing::info!(%peer, %error, failures, "client TLS handshake failed (failures: this one and those not logged since the last line)");
                    }
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
        let client = Arc::new(client);
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(Arc::clone(&client));
            // Boxed (by `call`): hyper keeps a stream's task as large as the service's future for
            // the stream's whole life, and a call's future (sized by the longest unary path) would
            // otherwise cost every long-lived Watch stream a few KiB after it has answered.
            Arc::clone(&forwarder).call(request)
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
                _ = closing.cancelled(), if !draining => {
                    if unread.is_stuck() {
                        // Dropping the connection resets its streams; what they held is freed.
                        self.metrics.client_connection_closed(ClosedBecause::AnswersUnread);
                        tracing::debug!(%peer, "client took nothing of an answer for --unread-response-timeout; connection closed");
                        return;
                    }
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
pub type Http2Server = hyper::server::conn::http2::Builder<TokioExecutor>;

/// The HTTP/2 server settings of client connections.
pub fn http2_server(config: &Config) -> Http2Server {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CLIENT_CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_header_list_size(config.limits.max_header_list)
        // etcd sends no Date header; adding one would make responses differ from direct ones.
        .auto_date_header(false)
        // Large responses leave as fast as the client reads them, not in 400 KiB steps.
        .max_send_buf_size(MAX_SEND_BUFFER);
    // A silent connection is pinged: clients that answer stay (old clients may not reconnect
    // gracefully), half-open ones and peers that never speak HTTP/2 are closed.
    if let Some(idle) = config.limits.idle_connection_timeout {
        builder.keep_alive_interval(idle).keep_alive_timeout(idle.min(MAX_PING_ANSWER_TIME));
    }
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failed_handshakes_are_logged_once_a_second_with_their_count() {
        let log = FailureLog::new();
        assert_eq!(log.failed(), Some(1), "the first is logged");
        assert_eq!((log.failed(), log.failed()), (None, None));
        tokio::time::advance(TLS_FAILURE_LOG_EVERY).await;
        assert_eq!(log.failed(), Some(3), "the next line counts those not logged");
        assert_eq!(log.failed(), None);
    }
}
