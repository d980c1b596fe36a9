//! What the proxy knows about the certificates it has loaded: expiry for `/metrics`, `/health`
//! and warning logs, reload outcomes, and legacy-exception connections.
//!
//! The TLS builders in [`crate::tls`] describe each file they load as [`LoadedCert`]s; the
//! reloader publishes them here per side, so metrics always show what new handshakes use.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

/// Seconds per day, for day thresholds.
const DAY: i64 = 86_400;

/// One certificate in use, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedCert {
    /// What it is used for: `listener`, `client-ca`, `legacy-client-ca`, `upstream-client` or `upstream-ca`.
    pub role: &'static str,
    /// The file it was read from, as configured.
    pub path: String,
    /// Subject distinguished name.
    pub subject: String,
    /// End of validity, unix seconds.
    pub not_after: i64,
}

impl LoadedCert {
    /// Whole days left at `now` (negative once expired).
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(DAY)
    }

    /// The expiry date as `YYYY-MM-DD HH:MM:SS UTC`, for messages.
    pub fn expiry_text(&self) -> String {
        format_unix(self.not_after)
    }
}

/// Formats unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_unix(seconds: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(seconds) {
        Ok(time) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            time.year(),
            u8::from(time.month()),
            time.day(),
            time.hour(),
            time.minute(),
            time.second()
        ),
        Err(_) => format!("unix time {seconds}"),
    }
}

/// The certificate side a reload concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// Client-facing: the listener certificate, client CAs, CRL, legacy CA.
    Listener,
    /// Proxy to etcd: the client certificate and etcd's CAs.
    Upstream,
}

impl Side {
    /// Label value in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Side::Listener => "listener",
            Side::Upstream => "upstream",
        }
    }
}

/// Thresholds for expiry warnings and `/health` degradation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryPolicy {
    /// Log a warning once a certificate has fewer days left than this.
    pub warning_days: u32,
    /// `/health` reports degraded once a certificate has fewer days left than this.
    pub critical_days: u32,
}

impl Default for ExpiryPolicy {
    fn default() -> Self {
        ExpiryPolicy { warning_days: 30, critical_days: 7 }
    }
}

/// Certificates in use and their counters; shared by the reloader, the verifiers and the admin server.
#[derive(Default)]
pub struct CertRegistry {
    loaded: Mutex<BTreeMap<Side, Vec<LoadedCert>>>,
    policy: Mutex<ExpiryPolicy>,
    reloads: Mutex<BTreeMap<(Side, &'static str), u64>>,
    legacy_connections: Arc<AtomicU64>,
    redials_ok: AtomicU64,
    redials_failed: AtomicU64,
}

impl CertRegistry {
    /// Counts upstream connections replaced after a reload, and those that could not be.
    pub fn count_redials(&self, redialled: usize, failed: usize) {
        self.redials_ok.fetch_add(redialled as u64, Relaxed);
        self.redials_failed.fetch_add(failed as u64, Relaxed);
    }

    /// Sets the warning and critical thresholds.
    pub fn set_policy(&self, policy: ExpiryPolicy) {
        if let Ok(mut current) = self.policy.lock() {
            *current = policy;
        }
    }

    /// The current thresholds.
    pub fn policy(&self) -> ExpiryPolicy {
        self.policy.lock().map(|p| *p).unwrap_or_default()
    }

    /// Replaces what `side` uses, after a successful (re)load.
    pub fn publish(&self, side: Side, certs: Vec<LoadedCert>) {
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.insert(side, certs);
        }
    }

    /// Counts a reload attempt of `side`: `outcome` is `applied` or `rejected`.
    pub fn count_reload(&self, side: Side, outcome: &'static str) {
        if let Ok(mut reloads) = self.reloads.lock() {
            *reloads.entry((side, outcome)).or_default() += 1;
        }
    }

    /// The counter the legacy client verifier increments per accepted expired certificate.
    pub fn legacy_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.legacy_connections)
    }

    /// Every certificate in use, listener side first.
    pub fn all(&self) -> Vec<LoadedCert> {
        self.loaded.lock().map(|loaded| loaded.values().flatten().cloned().collect()).unwrap_or_default()
    }

    /// Certificates with fewer than `days` days left at `now`, soonest first.
    pub fn expiring_within(&self, days: u32, now: i64) -> Vec<LoadedCert> {
        let mut expiring: Vec<LoadedCert> =
            self.all().into_iter().filter(|cert| cert.not_after - now < i64::from(days) * DAY).collect();
        expiring.sort_by_key(|cert| cert.not_after);
        expiring
    }

    /// Logs one warning per certificate inside the warning window (an error once expired);
    /// `only` limits it to one side, e.g. the one just reloaded.
    pub fn warn_expiring(&self, now: i64, only: Option<Side>) {
        let policy = self.policy();
        let in_scope = |cert: &LoadedCert| match only {
            None => true,
            Some(side) => self
                .loaded
                .lock()
                .map(|loaded| loaded.get(&side).is_some_and(|certs| certs.contains(cert)))
                .unwrap_or(false),
        };
        for cert in self.expiring_within(policy.warning_days, now).into_iter().filter(in_scope) {
            let days_left = cert.days_left(now);
            if cert.not_after <= now {
                tracing::error!(
                    role = cert.role,
                    file = %cert.path,
                    subject = %cert.subject,
                    expired = %cert.expiry_text(),
                    "certificate has expired; renew it (etcd-compat-proxy certs renew) and replace the file, the proxy reloads it"
                );
            } else {
                tracing::warn!(
                    role = cert.role,
                    file = %cert.path,
                    subject = %cert.subject,
                    expires = %cert.expiry_text(),
                    days_left,
                    "certificate expires soon; renew it (etcd-compat-proxy certs renew) and replace the file, the proxy reloads it"
                );
            }
        }
    }

    /// Appends the certificate series in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP etcd_compat_proxy_certificate_expiry_timestamp_seconds End of validity (unix seconds) of every certificate the proxy uses, by role, file and subject.\n# TYPE etcd_compat_proxy_certificate_expiry_timestamp_seconds gauge\n");
        for cert in self.all() {
            let _ = writeln!(
                out,
                "etcd_compat_proxy_certificate_expiry_timestamp_seconds{{role=\"{}\",path={},subject={}}} {}",
                cert.role,
                label_value(&cert.path),
                label_value(&cert.subject),
                cert.not_after
            );
        }
        out.push_str("# HELP etcd_compat_proxy_certificate_reloads_total Certificate reloads by side and outcome (applied, rejected).\n# TYPE etcd_compat_proxy_certificate_reloads_total counter\n");
        if let Ok(reloads) = self.reloads.lock() {
            for ((side, outcome), n) in reloads.iter() {
                let _ = writeln!(
                    out,
                    "etcd_compat_proxy_certificate_reloads_total{{side=\"{}\",outcome=\"{outcome}\"}} {n}",
                    side.label()
                );
            }
        }
        out.push_str("# HELP etcd_compat_proxy_upstream_redials_total Upstream connections re-dialled after a TLS reload, by outcome (the old connection drains).\n# TYPE etcd_compat_proxy_upstream_redials_total counter\n");
        let _ = writeln!(
            out,
            "etcd_compat_proxy_upstream_redials_total{{outcome=\"ok\"}} {}",
            self.redials_ok.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "etcd_compat_proxy_upstream_redials_total{{outcome=\"failed\"}} {}",
            self.redials_failed.load(Relaxed)
        );
        out.push_str("# HELP etcd_compat_proxy_legacy_expired_client_certificates_total Client connections let in with an expired certificate under --legacy-client-ca-file.\n# TYPE etcd_compat_proxy_legacy_expired_client_certificates_total counter\n");
        let _ = writeln!(
            out,
            "etcd_compat_proxy_legacy_expired_client_certificates_total {}",
            self.legacy_connections.load(Relaxed)
        );
    }
}

/// A Prometheus label value: quoted, with backslash, quote and newline escaped.
fn label_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The current time in unix seconds.
pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(role: &'static str, not_after: i64) -> LoadedCert {
        LoadedCert { role, path: "/pki/a \"b\".pem".into(), subject: "CN=a".into(), not_after }
    }

    #[test]
    fn expiring_and_rendering() {
        let registry = CertRegistry::default();
        let now = 1_000_000_000;
        registry.publish(Side::Listener, vec![cert("listener", now + 10 * DAY), cert("client-ca", now + 400 * DAY)]);
        registry.publish(Side::Upstream, vec![cert("upstream-client", now - 1)]);
        let expiring = registry.expiring_within(30, now);
        assert_eq!(expiring.iter().map(|c| c.role).collect::<Vec<_>>(), ["upstream-client", "listener"]);
        assert_eq!(expiring[1].days_left(now), 10);
        assert_eq!(expiring[0].days_left(now), -1);
        let mut out = String::new();
        registry.render(&mut out);
        assert!(out.contains(&format!(
            "etcd_compat_proxy_certificate_expiry_timestamp_seconds{{role=\"listener\",path=\"/pki/a \\\"b\\\".pem\",subject=\"CN=a\"}} {}\n",
            now + 10 * DAY
        )));
        assert_eq!(format_unix(0), "1970-01-01 00:00:00 UTC");
    }
}
