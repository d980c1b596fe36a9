//! The admin HTTP server on `--metrics-addr`: `/health` (etcd's shape plus the proxy's view of
//! each member), `/ready` (whether to send clients here), `/metrics` (the counters of [`metrics`], which the whole proxy writes to),
//! `/doctor` (the doctor's report, [`doctor`]),
//! the migration's calls under `/migrate/` ([`migrate`]), which `etcd-compat-proxy migrate`
//! makes, and the status page at `/` with its files under `/assets/` ([`status_page`]), whose
//! script reads the other answers. Reads the cluster and the certificates; nothing it serves
//! feeds back into a call.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::auth::Secret;
use crate::migrate::Migration;
use crate::upstream::Cluster;

pub use doctor::DoctorEndpoint;
pub use metrics::{ClosedBecause, Metrics, Refusal, RenderMetrics};

mod doctor;
pub mod metrics;
mod migrate;
mod status_page;

/// An admin answer's body: whole, or streamed (a snapshot); an error cuts the connection so
/// that the reader sees an incomplete answer rather than a short one.
type AdminBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// What the admin endpoints read from.
pub struct Admin {
    /// The cluster view, for `/health` and the member series of `/metrics`.
    pub upstream: Arc<Cluster>,
    /// The request counters.
    pub metrics: Arc<Metrics>,
    /// The migration the `/migrate/` calls drive.
    pub migration: Arc<Migration>,
    /// `--admin-token-file`'s token; `None` refuses the calls that need it.
    pub token: Option<Secret>,
    /// Set once the proxy received SIGTERM and drains.
    pub draining: Arc<AtomicBool>,
    /// The doctor's report behind `/doctor`.
    pub doctor: DoctorEndpoint,
}

impl Admin {
    /// Serves one admin connection (HTTP/1.1) to its end.
    pub async fn serve_connection(self: Arc<Self>, stream: TcpStream) {
        let service = hyper::service::service_fn(move |request| {
            let admin = Arc::clone(&self);
            async move { Ok::<_, Infallible>(admin.answer(request).await) }
        });
        if let Err(error) =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
        {
            tracing::debug!(%error, "admin connection ended with an error");
        }
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<AdminBody> {
        match request.uri().path() {
            "/health" => self.health(),
            "/ready" => self.ready(),
            "/metrics" => {
                let mut text = self.metrics.render(&self.upstream);
                migrate::render_metrics(&self.migration.status(), &mut text);
                reply(StatusCode::OK, "text/plain; version=0.0.4", text)
            }
            "/doctor" => {
                let json = self.doctor.report_json().await;
                reply(StatusCode::OK, "application/json", json.to_string())
            }
            path if path.starts_with("/migrate/") => self.migrate(request).await,
            path if path == "/" || path.starts_with("/assets/") => status_page::answer(path),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: the admin server serves / (the status page), /health, /ready, /metrics, /doctor and /migrate/\n"
                    .to_owned(),
            ),
        }
    }

    /// Whether a load balancer or orchestrator should send clients here: 200 once the listener
    /// is bound and a member that serves clients is healthy; 503 before that, and from SIGTERM on.
    fn ready(&self) -> Response<AdminBody> {
        let (status, text) = if self.draining.load(Ordering::Relaxed) {
            (StatusCode::SERVICE_UNAVAILABLE, "draining: the proxy is shutting down\n")
        } else if self.upstream.any_healthy() {
            (StatusCode::OK, "ready\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: no etcd member that serves clients is healthy yet\n")
        };
        reply(status, "text/plain", text.to_owned())
    }

    /// etcd's `/health` shape (`health`, `reason`) plus the proxy's view of each member.
    fn health(&self) -> Response<AdminBody> {
        let healthy = self.upstream.any_healthy();
        let leader = self.upstream.view.leader();
        let members: Vec<String> = self
            .upstream
            .members()
            .iter()
            .map(|m| {
                format!(
                    "{{\"endpoint\":{},\"healthy\":{},\"error\":{},{}}}",
                    json_string(&m.endpoint.url()),
                    m.is_healthy(),
                    m.last_error().filter(|_| !m.is_healthy()).map_or("null".to_owned(), |e| json_string(&e)),
                    cluster_fields(m, leader)
                )
            })
            .collect();
        let reason = if healthy { String::new() } else { "no etcd member is reachable".to_owned() };
        // Expiring certificates degrade health without failing it: the proxy still serves, and a
        // 503 would only get it restarted, which does not renew anything.
        let now = crate::tls::now_unix();
        let critical_days = self.metrics.certificates.policy().critical_days;
        let expiring: Vec<String> = self
            .metrics
            .certificates
            .expiring_within(critical_days, now)
            .iter()
            .map(|cert| {
                format!(
                    "{{\"role\":{},\"path\":{},\"subject\":{},\"not_after\":{},\"days_left\":{}}}",
                    json_string(cert.role),
                    json_string(&cert.path),
                    json_string(&cert.subject),
                    json_string(&cert.expiry_text()),
                    cert.days_left(now)
                )
            })
            .collect();
        let body = format!(
            "{{\"health\":\"{healthy}\",\"reason\":{},\"members\":[{}],\"degraded\":{},\"expiring_certificates\":[{}]}}\n",
            json_string(&reason),
            members.join(","),
            !expiring.is_empty(),
            expiring.join(",")
        );
        let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        reply(status, "application/json", body)
    }
}

/// The cluster view's facts about a member: etcd's id (hex, as etcdctl prints it), name and
/// release, whether it is a learner, the leader, or no longer in the member list.
fn cluster_fields(member: &crate::upstream::Member, leader: u64) -> String {
    let id = member.role.id();
    format!(
        "\"id\":{},\"name\":{},\"version\":{},\"learner\":{},\"leader\":{},\"in_cluster\":{}",
        if id == 0 { "null".to_owned() } else { format!("\"{id:x}\"") },
        member.role.name().map_or("null".to_owned(), |n| json_string(&n)),
        member.role.version().map_or("null".to_owned(), |v| json_string(&v)),
        member.role.is_learner(),
        id != 0 && id == leader,
        !member.role.is_departed()
    )
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<AdminBody> {
    let whole = Full::new(Bytes::from(body)).map_err(|never: Infallible| match never {});
    let mut response = Response::new(whole.boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

/// Minimal JSON string escaping, enough for endpoints and error messages.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_escaping() {
        assert_eq!(super::json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
