//! The diagnosis behind `etcd-compat-proxy doctor` and the admin `/doctor`: it reads the cluster
//! as a client ([`facts`]), judges what it read ([`checks`]) and says it ([`report`]). It never
//! changes the cluster; `recover` does, with the same reads.

pub mod checks;
pub mod facts;
pub mod report;

use std::time::Duration;

use time::OffsetDateTime;

use crate::cluster_access::ClusterAccess;
use crate::config::Config;
use crate::tls::{ExpiryPolicy, LoadedCert};

pub use report::Report;

use facts::{Facts, MemberFacts, ReadLimits};
use report::{CertRow, ClusterRow, MemberRow};

/// Where findings start.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// The members' quota when they do not report it.
    pub quota_backend_bytes: i64,
    /// History kept (current minus compacted revision) past which the history check warns.
    pub history_warning_revisions: i64,
    /// The legacy clients' response budget (`--max-response-bytes`).
    pub max_response_bytes: usize,
    /// Days left that make a certificate a warning or critical.
    pub cert_expiry: ExpiryPolicy,
}

/// What one diagnosis needs besides the cluster.
#[derive(Debug, Clone)]
pub struct Settings {
    pub thresholds: Thresholds,
    pub limits: ReadLimits,
}

impl Settings {
    /// The proxy's configured thresholds, budget and certificate policy.
    pub fn of(config: &Config) -> Settings {
        Settings {
            thresholds: Thresholds {
                quota_backend_bytes: config.doctor.quota_backend_bytes,
                history_warning_revisions: config.doctor.history_warning_revisions,
                max_response_bytes: config.budget.max_response_bytes,
                cert_expiry: config.cert_expiry,
            },
            limits: ReadLimits { scan_bytes: config.doctor.scan_bytes, sample_gap: Duration::from_secs(1) },
        }
    }
}

/// Diagnoses the cluster behind `access`; `proxy_certs` are the certificates the proxy itself
/// loads, judged beside the ones the members serve, and `cert_errors` why others could not be.
pub async fn diagnose(
    access: &ClusterAccess,
    settings: &Settings,
    proxy_certs: Vec<LoadedCert>,
    mut cert_errors: Vec<String>,
) -> Report {
    let facts = facts::gather(access, settings.limits).await;
    let (member_certs, member_cert_errors) = served_certificates(access, &facts).await;
    cert_errors.extend(member_cert_errors);
    let now = crate::tls::now_unix();
    let mut certs: Vec<CertRow> = proxy_certs
        .iter()
        .map(|cert| CertRow {
            source: cert.role.to_owned(),
            path: cert.path.clone(),
            subject: cert.subject.clone(),
            not_after: cert.expiry_text(),
            days_left: cert.days_left(now),
        })
        .collect();
    certs.extend(member_certs);
    let checks = checks::run(&facts, &certs, &cert_errors, &settings.thresholds);
    Report::new(cluster_row(&facts), member_rows(&facts, &settings.thresholds), certs, checks)
}

fn cluster_row(facts: &Facts) -> ClusterRow {
    let leader =
        facts.members.as_ref().ok().and_then(|members| {
            members.iter().filter_map(|m| m.status.as_ref().ok()).map(|s| s.leader).find(|l| *l != 0)
        });
    ClusterRow {
        revision: facts.revision,
        compact_revision: facts.compact_revision.as_ref().ok().copied(),
        leader: leader.map(|l| format!("{l:x}")),
    }
}

fn member_rows(facts: &Facts, thresholds: &Thresholds) -> Vec<MemberRow> {
    let Ok(members) = &facts.members else { return Vec::new() };
    members
        .iter()
        .map(|member| {
            let status = member.status.as_ref().ok();
            let role = match status {
                None => "unknown",
                Some(_) if member.is_learner => "learner",
                Some(s) if s.leader == member.id => "leader",
                Some(_) => "follower",
            };
            MemberRow {
                name: member.name.clone(),
                id: format!("{:x}", member.id),
                endpoint: member.client_urls.first().cloned(),
                role,
                reachable: status.is_some(),
                version: status.map(|s| s.version.clone()),
                db_size: status.map(|s| s.db_size),
                db_size_in_use: status.map(|s| s.db_size_in_use),
                quota: status.map_or(thresholds.quota_backend_bytes, |s| checks::quota_of(s, thresholds)),
                raft_index: status.map(|s| s.raft_index),
                raft_applied_index: status.map(|s| s.raft_applied_index),
                status_ms: status.map(|s| s.latency.as_secs_f64() * 1000.0),
                alarms: checks::alarms_of(facts, member.id),
                error: member.status.as_ref().err().cloned(),
            }
        })
        .collect()
}

/// The leaf certificate each TLS member serves, read as `certs inspect --endpoints` reads it.
async fn served_certificates(access: &ClusterAccess, facts: &Facts) -> (Vec<CertRow>, Vec<String>) {
    let Ok(members) = &facts.members else { return (Vec::new(), Vec::new()) };
    let client_cert = access.tls.as_ref().and_then(|tls| tls.client_cert.clone());
    let targets: Vec<(String, String)> = members
        .iter()
        .filter(|m| m.status.is_ok())
        .filter_map(|m: &MemberFacts| {
            let url = m.client_urls.iter().find(|u| u.starts_with("https://"))?;
            Some((format!("member {}", checks::member_label(m)), url.clone()))
        })
        .collect();
    if targets.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let read = tokio::task::spawn_blocking(move || {
        let now = OffsetDateTime::now_utc();
        let mut rows = Vec::new();
        let mut errors = Vec::new();
        for (source, url) in targets {
            let identity = client_cert.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path()));
            let leaf =
                crate::tls::served::fetch_served_chain(&url, identity, Duration::from_secs(5)).and_then(|served| {
                    let leaf = served.chain.first().ok_or_else(|| format!("{url}: no certificate served"))?;
                    etcd_compat_certs::inspect(leaf).map_err(|e| format!("{url}: {e}"))
                });
            match leaf {
                Ok(info) => rows.push(CertRow {
                    source,
                    path: url,
                    subject: info.subject.clone(),
                    not_after: crate::tls::format_unix(info.not_after.unix_timestamp()),
                    days_left: info.days_left(now),
                }),
                Err(error) => errors.push(format!("{source}: its certificate cannot be read: {error}")),
            }
        }
        (rows, errors)
    });
    read.await.unwrap_or_else(|error| (Vec::new(), vec![format!("reading served certificates failed: {error}")]))
}
