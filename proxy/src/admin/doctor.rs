//! `GET /doctor`: the doctor's report (JSON, as `doctor --output json` prints it) of the cluster
//! as the running proxy reaches it, with the certificates the proxy has loaded now.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster_access::ClusterAccess;
use crate::doctor::{self, Settings};
use crate::tls::CertRegistry;

/// How long a report is served again: status pages left open, or anyone who can reach the admin
/// address, must not turn into load on etcd (a diagnosis is a few dozen small calls and a scan of
/// up to --doctor-scan-bytes, 64 MiB by default).
const FRESH_FOR: Duration = Duration::from_secs(60);

/// Diagnoses on demand, at most once per [`FRESH_FOR`].
pub struct DoctorEndpoint {
    access: ClusterAccess,
    settings: Settings,
    certificates: Arc<CertRegistry>,
    /// The last report; the lock also makes concurrent requests wait for one diagnosis.
    last: tokio::sync::Mutex<Option<(Instant, Arc<str>)>>,
}

impl DoctorEndpoint {
    /// An endpoint diagnosing the cluster behind `access` against `settings`.
    pub fn new(access: ClusterAccess, settings: Settings, certificates: Arc<CertRegistry>) -> DoctorEndpoint {
        DoctorEndpoint { access, settings, certificates, last: tokio::sync::Mutex::new(None) }
    }

    /// The report as JSON, fresh within [`FRESH_FOR`].
    pub async fn report_json(&self) -> Arc<str> {
        let mut last = self.last.lock().await;
        if let Some((at, json)) = last.as_ref() {
            if at.elapsed() < FRESH_FOR {
                return Arc::clone(json);
            }
        }
        let report = doctor::diagnose(&self.access, &self.settings, self.certificates.all(), Vec::new()).await;
        let json: Arc<str> = Arc::from(report.to_json());
        *last = Some((Instant::now(), Arc::clone(&json)));
        json
    }
}
