//! The migration's admin calls, made by `etcd-compat-proxy migrate`:
//! - `GET /migrate/status`: where the migration stands (open, like `/health`);
//! - `GET /migrate/snapshot`: a snapshot of the cluster serving clients, streamed;
//! - `POST /migrate/mirror`: start mirroring to a target cluster (JSON body, see [`MirrorRequest`]);
//! - `POST /migrate/verify`: compare source and target at the mirror's revision;
//! - `POST /migrate/cutover`: hold writes, switch clients to the target (JSON body, see [`CutoverRequest`]);
//! - `POST /migrate/abort`: stop mirroring.
//!
//! Every call but status needs `Authorization: Bearer <token of --admin-token-file>`: they change
//! the cluster or read all of its data out. Answers are JSON, errors `{"error": "..."}`.

use std::path::PathBuf;

use bytes::Bytes;
use futures_util::stream;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Deserialize;

use super::{reply, Admin, AdminBody};
use crate::cluster_access::{ClusterAccess, TlsFiles};
use crate::migrate::{MigrateError, MigrationStatus, Phase};

/// Largest request body an admin call reads.
const MAX_REQUEST_BODY: usize = 64 * 1024;

/// The body of `POST /migrate/mirror`. Paths are read by the proxy, on its machine: the target
/// becomes the cluster that serves clients at cutover, and its files are reloaded like the
/// source's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorRequest {
    /// The target's client endpoints.
    pub to: Vec<String>,
    #[serde(default)]
    pub to_cacert: Vec<PathBuf>,
    pub to_cert: Option<PathBuf>,
    pub to_key: Option<PathBuf>,
}

/// The body of `POST /migrate/cutover`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverRequest {
    /// The longest writes may be held, in milliseconds.
    pub max_hold_ms: u64,
}

impl Admin {
    /// Serves a `/migrate/` call.
    pub(super) async fn migrate(&self, request: Request<Incoming>) -> Response<AdminBody> {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        if path == "/migrate/status" {
            return match method {
                Method::GET => json(StatusCode::OK, &self.migration.status()),
                _ => wrong_method("GET"),
            };
        }
        let wanted = match path.as_str() {
            "/migrate/snapshot" => Method::GET,
            "/migrate/mirror" | "/migrate/verify" | "/migrate/cutover" | "/migrate/abort" => Method::POST,
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "no such migration call: /migrate/ serves status, snapshot, mirror, verify, cutover and abort",
                )
            }
        };
        if method != wanted {
            return wrong_method(wanted.as_str());
        }
        if let Err(refused) = self.authorize(&request) {
            return refused;
        }
        match path.as_str() {
            "/migrate/snapshot" => self.snapshot().await,
            "/migrate/mirror" => self.mirror(request).await,
            "/migrate/verify" => match self.migration.verify().await {
                Ok(comparison) => json(StatusCode::OK, &comparison),
                Err(failure) => migrate_error(&failure),
            },
            "/migrate/cutover" => self.cutover(request).await,
            _ => match self.migration.abort() {
                Ok(status) => json(StatusCode::OK, &status),
                Err(failure) => migrate_error(&failure),
            },
        }
    }

    /// Checks the bearer token; the answer says how to get one without echoing what was sent.
    #[allow(clippy::result_large_err)]
    fn authorize(&self, request: &Request<Incoming>) -> Result<(), Response<AdminBody>> {
        let Some(token) = &self.token else {
            return Err(error(
                StatusCode::FORBIDDEN,
                "this admin call is disabled: start the proxy with --admin-token-file FILE (or \
                 ETCD_COMPAT_PROXY_ADMIN_TOKEN_FILE, or admin-token-file in its TOML file) and give \
                 `etcd-compat-proxy migrate` the same file with --admin-token-file",
            ));
        };
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if same_secret(presented, token.expose()) {
            Ok(())
        } else {
            tracing::warn!("an admin call was refused: its bearer token is missing or wrong");
            Err(error(
                StatusCode::UNAUTHORIZED,
                "this admin call needs the proxy's admin token: pass --admin-token-file with the file the proxy was \
                 started with (--admin-token-file)",
            ))
        }
    }

    /// Streams the source's snapshot as etcd sends it: the database, then its SHA-256.
    async fn snapshot(&self) -> Response<AdminBody> {
        let mut client = match self.migration.source().connect("the source cluster").await {
            Ok(client) => client,
            Err(failure) => return migrate_error(&failure.into()),
        };
        let mut snapshot = match client.snapshot().await {
            Ok(snapshot) => snapshot,
            Err(failure) => return migrate_error(&MigrateError::etcd("starting a snapshot", failure)),
        };
        // The first message tells the size, for the command's progress bar.
        let first = match snapshot.message().await {
            Ok(Some(first)) => first,
            Ok(None) => return migrate_error(&MigrateError::answer("taking a snapshot", "etcd sent nothing")),
            Err(failure) => return migrate_error(&MigrateError::etcd("taking a snapshot", failure)),
        };
        let expected = first.blob().len() as u64 + first.remaining_bytes();
        tracing::info!(bytes = expected, "streaming a snapshot of the source cluster to an admin client");
        let chunks = stream::unfold(
            (Some(Bytes::copy_from_slice(first.blob())), snapshot, client, 0u64),
            |(pending, mut snapshot, client, sent)| async move {
                if let Some(chunk) = pending {
                    let sent = sent + chunk.len() as u64;
                    return Some((Ok(Frame::data(chunk)), (None, snapshot, client, sent)));
                }
                match snapshot.message().await {
                    Ok(Some(next)) => {
                        let chunk = Bytes::copy_from_slice(next.blob());
                        let sent = sent + chunk.len() as u64;
                        Some((Ok(Frame::data(chunk)), (None, snapshot, client, sent)))
                    }
                    Ok(None) => {
                        tracing::info!(bytes = sent, "snapshot streamed");
                        None
                    }
                    Err(failure) => {
                        tracing::warn!(bytes = sent, "the snapshot stream from etcd broke: {failure}");
                        let cut = std::io::Error::other(format!("the snapshot stream from etcd broke: {failure}"));
                        Some((Err(cut), (None, snapshot, client, sent)))
                    }
                }
            },
        );
        let mut response = Response::new(StreamBody::new(chunks).boxed_unsync());
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
        headers.insert("x-etcd-snapshot-bytes", header::HeaderValue::from(expected));
        response
    }

    async fn mirror(&self, request: Request<Incoming>) -> Response<AdminBody> {
        let body = match Limited::new(request.into_body(), MAX_REQUEST_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(failure) => return error(StatusCode::BAD_REQUEST, &format!("cannot read the request: {failure}")),
        };
        let wanted: MirrorRequest = match serde_json::from_slice(&body) {
            Ok(wanted) => wanted,
            Err(failure) => {
                return error(StatusCode::BAD_REQUEST, &format!("the request is not a mirror request: {failure}"))
            }
        };
        let target = match target_access(wanted, &self.migration.source()) {
            Ok(target) => target,
            Err(why) => return error(StatusCode::BAD_REQUEST, &why),
        };
        match self.migration.start_mirror(target).await {
            Ok(seed) => json(StatusCode::OK, &serde_json::json!({ "seed_revision": seed })),
            Err(failure) => migrate_error(&failure),
        }
    }
}

impl Admin {
    async fn cutover(&self, request: Request<Incoming>) -> Response<AdminBody> {
        let wanted: CutoverRequest = match read_json(request, "cutover").await {
            Ok(wanted) => wanted,
            Err(refused) => return refused,
        };
        match self.migration.cutover(std::time::Duration::from_millis(wanted.max_hold_ms)).await {
            Ok(report) => json(StatusCode::OK, &report),
            Err(failure) => migrate_error(&failure),
        }
    }
}

/// Reads a JSON request body of at most 64 KiB.
#[allow(clippy::result_large_err)]
async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
    what: &str,
) -> Result<T, Response<AdminBody>> {
    let body = match Limited::new(request.into_body(), MAX_REQUEST_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(failure) => return Err(error(StatusCode::BAD_REQUEST, &format!("cannot read the request: {failure}"))),
    };
    serde_json::from_slice(&body)
        .map_err(|failure| error(StatusCode::BAD_REQUEST, &format!("the request is not a {what} request: {failure}")))
}

/// The target as the mirror reaches it: its endpoints (TLS when any TLS file is given or the URL
/// says `https://`), and the source's etcd user, which a target restored from the source's
/// snapshot has too.
fn target_access(wanted: MirrorRequest, source: &ClusterAccess) -> Result<ClusterAccess, String> {
    let tls_files = !wanted.to_cacert.is_empty() || wanted.to_cert.is_some() || wanted.to_key.is_some();
    let mut endpoints = Vec::new();
    for raw in &wanted.to {
        let endpoint = crate::config::Endpoint::parse(raw, tls_files).map_err(|why| format!("--to {raw}: {why}"))?;
        endpoints.push(endpoint.url());
    }
    if endpoints.is_empty() {
        return Err("--to names no endpoint: list the new cluster's client URLs".to_owned());
    }
    let client_cert = match (wanted.to_cert, wanted.to_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("--to-cert and --to-key go together".to_owned()),
    };
    let tls =
        endpoints.iter().any(|e| e.starts_with("https://")).then_some(TlsFiles { cas: wanted.to_cacert, client_cert });
    Ok(ClusterAccess { endpoints, tls, credentials: source.credentials.clone(), unsupported: None })
}

/// The migration's series for `/metrics`: its phase (one series per phase, 1 for the current
/// one) and, once mirroring began, the revisions and the lag to alert on.
pub(super) fn render_metrics(status: &MigrationStatus, out: &mut String) {
    use std::fmt::Write;
    out.push_str("# HELP etcd_compat_proxy_migration_phase The migration's phase (1 for the current one).\n# TYPE etcd_compat_proxy_migration_phase gauge\n");
    for phase in [Phase::Idle, Phase::Mirroring, Phase::CuttingOver, Phase::CutOver, Phase::Aborted, Phase::Failed] {
        let _ = writeln!(
            out,
            "etcd_compat_proxy_migration_phase{{phase=\"{}\"}} {}",
            phase.name(),
            u8::from(phase == status.phase)
        );
    }
    if status.seed_revision.is_none() {
        return;
    }
    for (name, help, value) in [
        ("source_revision", "The source cluster's revision when last seen.", status.source_revision),
        ("applied_revision", "The last source revision replayed onto the target.", status.applied_revision),
        ("lag_revisions", "Source revisions not yet replayed onto the target.", status.lag_revisions),
    ] {
        let _ = writeln!(
            out,
            "# HELP etcd_compat_proxy_migration_{name} {help}\n# TYPE etcd_compat_proxy_migration_{name} gauge\netcd_compat_proxy_migration_{name} {value}"
        );
    }
}

/// Compares two secrets in time that does not depend on where they differ.
fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    let digest = |bytes: &[u8]| ring::digest::digest(&ring::digest::SHA256, bytes);
    let (a, b) = (digest(presented), digest(expected));
    a.as_ref().iter().zip(b.as_ref()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<AdminBody> {
    let mut text = serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push('\n');
    reply(status, "application/json", text)
}

fn error(status: StatusCode, message: &str) -> Response<AdminBody> {
    json(status, &serde_json::json!({ "error": message }))
}

fn migrate_error(failure: &MigrateError) -> Response<AdminBody> {
    let status = match failure {
        MigrateError::Busy(_) | MigrateError::NoTarget => StatusCode::CONFLICT,
        MigrateError::Setup(_) => StatusCode::PRECONDITION_FAILED,
        MigrateError::Etcd { .. } => StatusCode::BAD_GATEWAY,
    };
    error(status, &failure.to_string())
}

fn wrong_method(allowed: &str) -> Response<AdminBody> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {allowed} for this call"));
    if let Ok(value) = header::HeaderValue::from_str(allowed) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_compare_whole() {
        assert!(super::same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!super::same_secret(b"0123456789abcdeF", b"0123456789abcdef"));
        assert!(!super::same_secret(b"", b"0123456789abcdef"));
        assert!(!super::same_secret(b"0123456789abcdef0", b"0123456789abcdef"));
    }
}
