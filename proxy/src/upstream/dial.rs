//! Dialling members: TCP, TLS with the material in use, the HTTP/2 handshake; and trying
//! reloaded TLS material on new connections before adopting it.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::error::UpstreamError;
use crate::transport::{BatchedWrites, Connection};

use super::{Cluster, Lane, Member};

impl Cluster {
    /// Returns a ready connection to `member` for `lane`, dialing if there is none.
    pub async fn connection(&self, member: &Member, lane: Lane) -> Result<Connection, UpstreamError> {
        if let Some(connection) = member.cached_connection(lane) {
            return Ok(connection);
        }
        let _dialing = member.dialing[lane as usize].lock().await;
        if let Some(connection) = member.cached_connection(lane) {
            return Ok(connection);
        }
        // Boxed: a rare path (see `call`).
        let connection = Box::pin(tokio::time::timeout(self.dial_timeout, self.dial(member)))
            .await
            .map_err(|_| UpstreamError::DialTimeout { endpoint: member.endpoint.url(), after: self.dial_timeout })??;
        if let Ok(mut slot) = member.connections[lane as usize].lock() {
            *slot = Some(connection.clone());
        }
        Ok(connection)
    }

    async fn dial(&self, member: &Member) -> Result<Connection, UpstreamError> {
        let dialled = self.dial_with(member, self.tls_config().map(|tls| tls.current())).await;
        // Material on trial (`adopt_tls_config`) reports its own refusals; this is the one in use.
        if let Err(UpstreamError::Tls { endpoint, source }) = &dialled {
            self.explainer.tls_handshake_failed(endpoint, source);
        }
        dialled
    }

    async fn dial_with(
        &self,
        member: &Member,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Connection, UpstreamError> {
        let endpoint = &member.endpoint;
        let connect_error = |source: std::io::Error| UpstreamError::Connect { endpoint: endpoint.url(), source };
        let tcp = TcpStream::connect(endpoint.authority.as_str()).await.map_err(connect_error)?;
        // gRPC messages are small and latency-bound: never wait to coalesce them.
        tcp.set_nodelay(true).map_err(connect_error)?;
        match tls {
            Some(tls) if endpoint.tls => {
                let connector = tokio_rustls::TlsConnector::from(tls);
                let server_name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                    .map_err(|_| UpstreamError::BadServerName { endpoint: endpoint.url() })?;
                let stream = connector
                    .connect(server_name, tcp)
                    .await
                    .map_err(|source| UpstreamError::Tls { endpoint: endpoint.url(), source })?;
                handshake(BatchedWrites(stream), member).await
            }
            _ => handshake(BatchedWrites(tcp), member).await,
        }
    }

    /// The upstream TLS config, for the certificate reloader.
    pub fn tls_config(&self) -> Option<Arc<crate::tls::Reloadable<rustls::ClientConfig>>> {
        match self.tls.read() {
            Ok(tls) => tls.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Tries a reloaded upstream TLS config before adopting it: every member that has a
    /// connection is dialled with `candidate` and health-checked over the new connection (a
    /// client certificate etcd refuses only shows there, after the TLS 1.3 handshake). If any
    /// member accepts it, or none is connected, it becomes the config of all later dials and each
    /// accepting member's new connection replaces its old one, which is left to finish its calls
    /// and streams; members that refused it keep their connection. If every connected member
    /// refuses it, nothing changes and the refusals are returned.
    pub async fn adopt_tls_config(
        &self,
        candidate: Arc<rustls::ClientConfig>,
    ) -> Result<RedialCounts, (RedialCounts, String)> {
        let Some(current) = self.tls_config() else {
            return Err((
                RedialCounts { redialled: 0, failed: 0 },
                "the upstream connections do not use TLS".to_owned(),
            ));
        };
        // A trial is a dial plus one health check, so it gets a little more than a dial.
        let trial_timeout = self.dial_timeout.max(Duration::from_secs(2));
        let mut accepted = Vec::new();
        let mut refusals = Vec::new();
        let members = self.members();
        for member in members.iter() {
            if member.cached_connection(Lane::Calls).is_none() && member.cached_connection(Lane::Streams).is_none() {
                // The next request dials with the adopted config anyway.
                continue;
            }
            let attempt = async {
                let connection = self.dial_with(member, Some(Arc::clone(&candidate))).await?;
                super::health::check_over(member, connection.clone()).await?;
                Ok::<_, UpstreamError>(connection)
            };
            match tokio::time::timeout(trial_timeout, attempt).await {
                Ok(Ok(connection)) => accepted.push((member, connection)),
                Ok(Err(error)) => refusals.push(format!("{}: {error}", member.name)),
                Err(_) => refusals.push(format!("{}: no answer within {trial_timeout:?}", member.name)),
            }
        }
        if accepted.is_empty() && !refusals.is_empty() {
            return Err((RedialCounts { redialled: 0, failed: refusals.len() }, refusals.join("; ")));
        }
        current.replace(candidate);
        for (member, connection) in &accepted {
            // A dial still running with the old config must not overwrite the new connection.
            let _calls = member.dialing[Lane::Calls as usize].lock().await;
            let _streams = member.dialing[Lane::Streams as usize].lock().await;
            if let Ok(mut slot) = member.connections[Lane::Calls as usize].lock() {
                *slot = Some(connection.clone());
            }
            // The next stream dials with the new material; streams running now stay where they are.
            if let Ok(mut slot) = member.connections[Lane::Streams as usize].lock() {
                *slot = None;
            }
        }
        for refusal in &refusals {
            tracing::error!(%refusal, "a member refused the reloaded TLS material; its existing connection stays in use");
        }
        Ok(RedialCounts { redialled: accepted.len(), failed: refusals.len() })
    }
}

/// Upstream connections replaced after a TLS reload, and members that refused the new material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedialCounts {
    /// Members now on a new connection.
    pub redialled: usize,
    /// Members that refused the new material and keep their old connection.
    pub failed: usize,
}

async fn handshake<T>(io: T, member: &Member) -> Result<Connection, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Connection::handshake(io, member.name(), member.retired.clone())
        .await
        .map_err(|source| UpstreamError::Handshake { endpoint: member.endpoint.url(), source })
}
