//! Moving the clients' data to a new cluster without the clients noticing, revision for revision.
//!
//! The new (*target*) cluster is seeded from a snapshot of the current (*source*) one, which
//! keeps every revision, lease and user. From then on the proxy replays each later source
//! revision onto the target as exactly one transaction ([`mirror`]), so that revision numbers,
//! keys' `mod_revision`s and versions stay identical on both, and checks after every
//! transaction that they are. [`compare`] proves a target is a seed of the source, and that
//! both hold the same data at a revision.
//!
//! What the mirror cannot carry through a watch (users, roles, permissions) is held still
//! while it runs: the request path refuses auth-store changes ([`Migration::auth_store_frozen`]).
//!
//! The mirror talks to both clusters as a client, with the typed `etcd-client` crate: this is
//! control-plane work, and its calls are few. Clients' calls never pass through here.

mod compare;
mod hold;
mod mirror;
pub mod snapshot_file;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Endpoint;
use crate::upstream::Cluster;

use crate::cluster_access::{ClusterAccess, ConnectError, TlsFiles};
pub use compare::Comparison;
pub use hold::WriteHold;

/// Where a migration stands, as `migrate status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No target cluster.
    Idle,
    /// Every source revision is being replayed onto the target.
    Mirroring,
    /// Writes are held while the target catches up, before clients are switched.
    CuttingOver,
    /// Clients are served by the former target.
    CutOver,
    /// An operator stopped the mirror; clients stayed on the source.
    Aborted,
    /// The mirror stopped on an error; clients stayed on the source.
    Failed,
}

impl Phase {
    /// The name `migrate status` shows.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Mirroring => "mirroring",
            Phase::CuttingOver => "cutting-over",
            Phase::CutOver => "cut-over",
            Phase::Aborted => "aborted",
            Phase::Failed => "failed",
        }
    }
}

impl Serialize for Phase {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// What `GET /migrate/status` answers.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationStatus {
    pub phase: Phase,
    /// The source cluster's revision when last seen.
    pub source_revision: i64,
    /// The last source revision replayed onto the target (equal to the target's revision).
    pub applied_revision: i64,
    /// `source_revision - applied_revision`.
    pub lag_revisions: i64,
    /// Why the mirror stopped, or what must be fixed before cutover.
    pub error: Option<String>,
    /// The revision the target was seeded at (its revision when mirroring began).
    pub seed_revision: Option<i64>,
    /// The target's client endpoints.
    pub target: Option<Vec<String>>,
    /// Transactions replayed onto the target since mirroring began.
    pub transactions: u64,
    /// Leases granted on the target to match the source.
    pub leases_granted: u64,
    /// Leases revoked on the target because the source no longer has them.
    pub leases_revoked: u64,
    /// Whether users, roles or permissions changed on the source since mirroring began
    /// (not carried by the mirror: fix before cutover).
    pub auth_store_changed: bool,
    /// When the phase last changed, in seconds since the Unix epoch.
    pub since_unix: u64,
}

/// Why a migration command was refused or failed, in words that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the migration is {}; wait for it, or run `etcd-compat-proxy migrate abort` to start again", .0.name())]
    Busy(Phase),
    #[error("no target cluster is being mirrored; start with `etcd-compat-proxy migrate mirror`")]
    NoTarget,
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {error}")]
    Etcd { what: String, error: String, transient: bool },
}

impl From<ConnectError> for MigrateError {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::Setup(why) => MigrateError::Setup(why),
            ConnectError::Etcd { what, error } => MigrateError::etcd(what, error),
        }
    }
}

impl MigrateError {
    /// An etcd call that failed, with what it was for; `error` says whether trying again may help.
    pub(crate) fn etcd(what: impl Into<String>, error: etcd_client::Error) -> Self {
        let transient = match &error {
            etcd_client::Error::GRpcStatus(status) => {
                use crate::grpc::Code;
                let code: i32 = status.code().into();
                [Code::Unavailable, Code::DeadlineExceeded, Code::Unknown, Code::Cancelled]
                    .iter()
                    .any(|c| *c as i32 == code)
            }
            etcd_client::Error::TransportError(_)
            | etcd_client::Error::IoError(_)
            | etcd_client::Error::WatchError(_) => true,
            etcd_client::Error::LeaseKeepAliveError(_) => true,
            _ => false,
        };
        MigrateError::Etcd { what: what.into(), error: error.to_string(), transient }
    }

    /// An answer from etcd that is not what it should be.
    pub(crate) fn answer(what: impl Into<String>, why: &str) -> Self {
        MigrateError::Etcd { what: what.into(), error: why.to_owned(), transient: true }
    }

    /// Whether the same work may succeed later (a member restarting, a connection lost).
    pub fn is_transient(&self) -> bool {
        matches!(self, MigrateError::Etcd { transient: true, .. })
    }
}

/// What `POST /migrate/cutover` answers.
#[derive(Debug, Clone, Serialize)]
pub struct CutoverReport {
    /// The revision both clusters were at when clients were switched.
    pub revision: i64,
    /// How long writes were held, in milliseconds.
    pub held_ms: u64,
    /// The cluster that now serves clients.
    pub serving: Vec<String>,
}

/// The proxy's one migration: its state, shared by the admin endpoints, the mirror task and the
/// request path.
pub struct Migration {
    /// How the proxy reaches the cluster that serves clients, as a client of its own; the
    /// target once the cutover is done.
    source: Mutex<ClusterAccess>,
    /// The cluster the request path sends calls to, switched at cutover.
    serving: Arc<Cluster>,
    /// The upstream TLS files the reloader watches, replaced by the target's at cutover.
    upstream_files: crate::tls::SharedUpstreamFiles,
    state: Mutex<State>,
    /// Read by the request path for auth-store changes only, so that it never takes the lock.
    auth_frozen: AtomicBool,
    /// Holds writes during the cutover.
    pub hold: WriteHold,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    source_revision: i64,
    applied_revision: i64,
    error: Option<String>,
    seed_revision: Option<i64>,
    target: Option<ClusterAccess>,
    transactions: u64,
    leases_granted: u64,
    leases_revoked: u64,
    auth_store_changed: bool,
    since: SystemTime,
    /// Stops the running mirror task.
    stop: Option<CancellationToken>,
    /// Counts mirror runs, so that a stopped run's last updates are ignored.
    run: u64,
}

impl Migration {
    /// An idle migration whose source is `serving`, reached as a client through `source`, with
    /// its TLS files in `upstream_files`.
    pub fn new(
        source: ClusterAccess,
        serving: Arc<Cluster>,
        upstream_files: crate::tls::SharedUpstreamFiles,
    ) -> Arc<Self> {
        Arc::new(Migration {
            source: Mutex::new(source),
            serving,
            upstream_files,
            hold: WriteHold::default(),
            state: Mutex::new(State {
                phase: Phase::Idle,
                source_revision: 0,
                applied_revision: 0,
                error: None,
                seed_revision: None,
                target: None,
                transactions: 0,
                leases_granted: 0,
                leases_revoked: 0,
                auth_store_changed: false,
                since: SystemTime::now(),
                stop: None,
                run: 0,
            }),
            auth_frozen: AtomicBool::new(false),
        })
    }

    /// The message an auth-store change gets while a migration holds the auth store still, or
    /// `None` when it may go ahead.
    pub fn auth_store_frozen(&self) -> Option<&'static str> {
        self.auth_frozen.load(Ordering::Relaxed).then_some(
            "etcd-compat-proxy: a migration to a new cluster is mirroring this cluster, and users, roles and \
             permissions are not mirrored: auth-store changes are refused until `etcd-compat-proxy migrate abort` \
             or the cutover",
        )
    }

    /// Where the migration stands.
    pub fn status(&self) -> MigrationStatus {
        let state = self.lock();
        MigrationStatus {
            phase: state.phase,
            source_revision: state.source_revision,
            applied_revision: state.applied_revision,
            lag_revisions: (state.source_revision - state.applied_revision).max(0),
            error: state.error.clone(),
            seed_revision: state.seed_revision,
            target: state.target.as_ref().map(|t| t.endpoints.clone()),
            transactions: state.transactions,
            leases_granted: state.leases_granted,
            leases_revoked: state.leases_revoked,
            auth_store_changed: state.auth_store_changed,
            since_unix: state.since.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        }
    }

    /// The cluster serving clients, for a snapshot or a comparison.
    pub fn source(&self) -> ClusterAccess {
        self.source.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Checks that `target` was seeded from a snapshot of the source and that the source still
    /// has every revision after it, then starts replaying them; returns the seed revision once
    /// the mirror runs.
    pub async fn start_mirror(self: &Arc<Self>, target: ClusterAccess) -> Result<i64, MigrateError> {
        {
            let state = self.lock();
            if matches!(state.phase, Phase::Mirroring | Phase::CuttingOver) {
                return Err(MigrateError::Busy(state.phase));
            }
        }
        let prepared = mirror::prepare(&self.source(), &target).await?;
        let seed = prepared.seed_revision();
        let stop = CancellationToken::new();
        let endpoints = target.endpoints.join(",");
        let run = {
            let mut state = self.lock();
            if matches!(state.phase, Phase::Mirroring | Phase::CuttingOver) {
                return Err(MigrateError::Busy(state.phase));
            }
            let run = state.run + 1;
            *state = State {
                phase: Phase::Mirroring,
                source_revision: prepared.source_revision(),
                applied_revision: seed,
                error: None,
                seed_revision: Some(seed),
                target: Some(target),
                transactions: 0,
                leases_granted: 0,
                leases_revoked: 0,
                auth_store_changed: false,
                since: SystemTime::now(),
                stop: Some(stop.clone()),
                run,
            };
            self.auth_frozen.store(true, Ordering::Relaxed);
            run
        };
        tracing::info!(seed_revision = seed, target = %endpoints, "mirroring to the target cluster");
        tokio::spawn(mirror::run(Arc::clone(self), prepared, run, stop));
        Ok(seed)
    }

    /// Stops the mirror; clients stay on the source. The target keeps what was replayed.
    pub fn abort(&self) -> Result<MigrationStatus, MigrateError> {
        {
            let mut state = self.lock();
            match state.phase {
                Phase::Mirroring | Phase::CuttingOver => {}
                Phase::Failed => {}
                Phase::CutOver => {
                    return Err(MigrateError::Setup(
                        "the cutover is done: clients are served by the new cluster, and abort no longer applies"
                            .to_owned(),
                    ))
                }
                Phase::Idle | Phase::Aborted => return Err(MigrateError::NoTarget),
            }
            if let Some(stop) = state.stop.take() {
                stop.cancel();
            }
            state.phase = Phase::Aborted;
            state.since = SystemTime::now();
            self.auth_frozen.store(false, Ordering::Relaxed);
        }
        tracing::info!("migration aborted; clients stay on the source cluster");
        Ok(self.status())
    }

    /// Compares the source and the target at the target's current revision.
    pub async fn verify(&self) -> Result<Comparison, MigrateError> {
        let (target, revision) = {
            let state = self.lock();
            let target = state.target.clone().ok_or(MigrateError::NoTarget)?;
            (target, state.applied_revision)
        };
        let source = self.source().connect("the source cluster").await?;
        let target = target.connect("the target cluster").await?;
        compare::at_revision(source, target, revision).await
    }

    /// Holds writes, waits until the mirror has replayed every revision the source acknowledged
    /// (at most `max_hold` in all), switches the request path to the target and lets the held
    /// writes go on to it. When the mirror cannot catch up in time, the writes go on to the
    /// source and the mirror keeps running.
    pub async fn cutover(&self, max_hold: Duration) -> Result<CutoverReport, MigrateError> {
        let (target, run) = {
            let mut state = self.lock();
            match state.phase {
                Phase::Mirroring => {}
                Phase::Failed => {
                    return Err(MigrateError::Setup(format!(
                        "the mirror failed ({}); abort and start again from a new snapshot",
                        state.error.as_deref().unwrap_or("no reason recorded")
                    )))
                }
                Phase::CuttingOver => return Err(MigrateError::Busy(state.phase)),
                Phase::CutOver => {
                    return Err(MigrateError::Setup("the cutover is already done".to_owned()));
                }
                Phase::Idle | Phase::Aborted => return Err(MigrateError::NoTarget),
            }
            if state.auth_store_changed {
                return Err(MigrateError::Setup(format!(
                    "not cutting over: {}",
                    state.error.as_deref().unwrap_or("the source's auth store changed")
                )));
            }
            let target = state.target.clone().ok_or(MigrateError::NoTarget)?;
            state.phase = Phase::CuttingOver;
            state.since = SystemTime::now();
            (target, state.run)
        };
        // Everything that can be prepared is prepared before writes are held.
        let prepared = match (
            serving_members(&target),
            self.source().connect("the source cluster").await.map_err(MigrateError::from),
        ) {
            (Ok(serving), Ok(source)) => Ok((serving, source)),
            (Err(failure), _) | (_, Err(failure)) => Err(failure),
        };
        let (serving, mut source) = match prepared {
            Ok(prepared) => prepared,
            Err(failure) => {
                self.back_to_mirroring(run);
                return Err(failure);
            }
        };
        let began = Instant::now();
        match self.hold_until_caught_up(&mut source, max_hold).await {
            Ok(revision) => {
                let (endpoints, tls) = serving;
                self.serving.switch_to(&endpoints, tls);
                // From now on the target's files are the ones reloaded when they change.
                *self.upstream_files.write().unwrap_or_else(PoisonError::into_inner) =
                    target.tls.as_ref().map(upstream_tls_files);
                {
                    let mut state = self.lock();
                    if let Some(stop) = state.stop.take() {
                        stop.cancel();
                    }
                    state.phase = Phase::CutOver;
                    state.since = SystemTime::now();
                    *self.source.lock().unwrap_or_else(PoisonError::into_inner) = target.clone();
                    self.auth_frozen.store(false, Ordering::Relaxed);
                }
                self.hold.open();
                let held = began.elapsed();
                tracing::info!(
                    revision,
                    held_ms = held.as_millis() as u64,
                    "cutover done: clients are served by the new cluster"
                );
                Ok(CutoverReport { revision, held_ms: held.as_millis() as u64, serving: target.endpoints })
            }
            Err(why) => {
                self.hold.open();
                let held = began.elapsed();
                self.back_to_mirroring(run);
                tracing::warn!(held_ms = held.as_millis() as u64, "cutover abandoned: {why}");
                Err(MigrateError::Setup(format!(
                    "cutover abandoned after holding writes for {} ms: {why}; clients stay on the current cluster \
                     and the held writes went on to it: nothing was lost",
                    held.as_millis()
                )))
            }
        }
    }

    /// Closes the write hold and waits until the mirror has applied the source's revision.
    async fn hold_until_caught_up(&self, source: &mut etcd_client::Client, max_hold: Duration) -> Result<i64, String> {
        let deadline = tokio::time::Instant::now() + max_hold;
        if !self.hold.close_and_drain(max_hold).await {
            return Err(format!("writes sent before the hold were not answered within --max-hold {max_hold:?}"));
        }
        let revision = match tokio::time::timeout_at(deadline, mirror::current_revision(source, "the source")).await {
            Ok(Ok((_, revision))) => revision,
            Ok(Err(failure)) => return Err(failure.to_string()),
            Err(_) => return Err(format!("the source did not tell its revision within --max-hold {max_hold:?}")),
        };
        loop {
            let (phase, applied, error) = {
                let state = self.lock();
                (state.phase, state.applied_revision, state.error.clone())
            };
            if phase != Phase::CuttingOver {
                return Err(format!("the mirror stopped ({})", error.unwrap_or_else(|| phase.name().to_owned())));
            }
            if applied >= revision {
                // A write that reached the source around the proxy would be lost after the
                // switch: the source must still be where the hold found it.
                return match tokio::time::timeout_at(deadline, mirror::current_revision(source, "the source")).await {
                    Ok(Ok((_, now))) if now == revision => Ok(revision),
                    Ok(Ok((_, now))) => Err(format!(
                        "the current cluster went from revision {revision} to {now} while writes were held: something \
                         writes to it without going through this proxy; point every writer at the proxy first"
                    )),
                    Ok(Err(failure)) => Err(failure.to_string()),
                    Err(_) => Err(format!("the source did not tell its revision within --max-hold {max_hold:?}")),
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the mirror did not catch up within --max-hold {max_hold:?}: it had replayed revision {applied} \
                     of {revision} (is the new cluster slow or stopped? see `etcd-compat-proxy migrate status`)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn back_to_mirroring(&self, run: u64) {
        let mut state = self.lock();
        if state.run == run && state.phase == Phase::CuttingOver {
            state.phase = Phase::Mirroring;
            state.since = SystemTime::now();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `change` on the state if mirror run `run` is still the one mirroring.
    fn update(&self, run: u64, change: impl FnOnce(&mut State)) -> bool {
        let mut state = self.lock();
        if state.run == run && matches!(state.phase, Phase::Mirroring | Phase::CuttingOver) {
            change(&mut state);
            true
        } else {
            false
        }
    }

    /// Records that mirror run `run` stopped on `error`.
    fn fail(&self, run: u64, error: String) {
        let failed = self.update(run, |state| {
            state.phase = Phase::Failed;
            state.error = Some(error.clone());
            state.since = SystemTime::now();
            state.stop = None;
        });
        if failed {
            self.auth_frozen.store(false, Ordering::Relaxed);
            tracing::error!("the migration mirror stopped: {error}");
        }
    }
}

/// The target as the request path reaches it: its endpoints and, for TLS, a client config built
/// from its files (the same rules as `--cacert`/`--cert`/`--key`).
#[allow(clippy::type_complexity)]
fn serving_members(target: &ClusterAccess) -> Result<(Vec<Endpoint>, Option<Arc<rustls::ClientConfig>>), MigrateError> {
    let endpoints = target
        .endpoints
        .iter()
        .map(|url| Endpoint::parse(url, false).map_err(|why| MigrateError::Setup(format!("{url}: {why}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let tls = match &target.tls {
        Some(files) => {
            let config = crate::tls::client_config(&upstream_tls_files(files))
                .map_err(|error| MigrateError::Setup(format!("the target's TLS files: {error}")))?;
            Some(config)
        }
        None => None,
    };
    Ok((endpoints, tls))
}

/// The target's TLS files as the upstream's (the same rules as `--cacert`/`--cert`/`--key`).
fn upstream_tls_files(files: &TlsFiles) -> crate::tls::UpstreamTlsFiles {
    crate::tls::UpstreamTlsFiles {
        cas: files.cas.clone(),
        client_cert: files.client_cert.clone(),
        insecure_skip_verify: false,
        server_cn: None,
    }
}
