//! One etcd member: where it listens, the proxy's connections to it, its health and what the
//! cluster view knows about it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::config::Endpoint;
use crate::transport::Connection;

use super::Lane;

/// Counters of one member, rendered in `/metrics`.
#[derive(Default)]
pub struct MemberStats {
    /// Requests sent to the member.
    pub requests: AtomicU64,
    /// Failed connections, sends and health checks.
    pub failures: AtomicU64,
}

/// One etcd member and the proxy's connection to it.
pub struct Member {
    /// Where the member listens.
    pub endpoint: Endpoint,
    /// The member's URL, for log and error messages.
    pub(super) name: Arc<str>,
    pub(super) scheme: http::uri::Scheme,
    pub(super) index: usize,
    pub(super) healthy: AtomicBool,
    /// The live connection of each [`Lane`], cloned per request (cheap: a handle to the
    /// connection task).
    pub(super) connections: [Mutex<Option<Connection>>; 2],
    /// Serialises dialing per lane so a burst of requests to a dead connection dials once.
    pub(super) dialing: [tokio::sync::Mutex<()>; 2],
    /// Last failure, for `/health` and error messages.
    pub(super) last_error: Mutex<Option<String>>,
    /// Counters for `/metrics`.
    pub stats: MemberStats,
    /// What the cluster view knows about this endpoint's member (id, learner, still in the cluster).
    pub role: MemberRole,
    /// Cancelled when the proxy stops using this member (the cluster was switched): closes its
    /// connections, so that streams on them move to the members that replaced it.
    pub(super) retired: tokio_util::sync::CancellationToken,
}

impl Member {
    /// A member at `endpoint`, at position `index` in the pool, not yet known to be healthy.
    pub(super) fn new(endpoint: &Endpoint, index: usize) -> Member {
        Member {
            name: Arc::from(endpoint.url()),
            scheme: if endpoint.tls { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP },
            endpoint: endpoint.clone(),
            index,
            healthy: AtomicBool::new(false),
            connections: [Mutex::new(None), Mutex::new(None)],
            dialing: [tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())],
            last_error: Mutex::new(None),
            stats: MemberStats::default(),
            role: MemberRole::default(),
            retired: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Whether the last health check or request to this member succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// The most recent failure seen on this member, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// The member's URL, shared cheaply for log and error messages.
    pub fn name(&self) -> Arc<str> {
        Arc::clone(&self.name)
    }

    /// Builds the URI for `path_and_query` on this member.
    pub fn uri(&self, path_and_query: http::uri::PathAndQuery) -> Result<http::Uri, http::Error> {
        // Scheme, authority and path are all shared buffers: building the URI copies nothing.
        http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.endpoint.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    /// The member's position in the pool.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// What routing needs to know about the member, read once per request.
    pub fn state(&self) -> MemberState {
        MemberState {
            healthy: self.is_healthy(),
            learner: self.role.is_learner(),
            departed: self.role.is_departed(),
            id: self.role.id(),
        }
    }

    pub(super) fn cached_connection(&self, lane: Lane) -> Option<Connection> {
        let guard = self.connections[lane as usize].lock().ok()?;
        guard.as_ref().filter(|c| !c.is_closed()).cloned()
    }
}

/// What the view knows about the member behind one endpoint; updated by refreshes and by
/// routing errors, read on every request.
#[derive(Default)]
pub struct MemberRole {
    /// etcd's member id, 0 until a Status answer names it.
    pub(super) id: AtomicU64,
    learner: AtomicBool,
    /// No longer in the member list (removed, or a second endpoint of a known member).
    departed: AtomicBool,
    /// etcd's member name, for `/health`.
    pub(super) name: Mutex<Option<String>>,
    /// The etcd release the member last reported in its Status answer, for `/health`: during a
    /// rolling upgrade it shows which members run the new binary.
    version: Mutex<Option<String>>,
}

impl MemberRole {
    /// etcd's member id, 0 while unknown.
    pub fn id(&self) -> u64 {
        self.id.load(Relaxed)
    }

    /// Whether the member is a learner (not yet promoted).
    pub fn is_learner(&self) -> bool {
        self.learner.load(Relaxed)
    }

    /// Whether the member left the cluster (or duplicates another endpoint of a member).
    pub fn is_departed(&self) -> bool {
        self.departed.load(Relaxed)
    }

    /// Whether ordinary client requests may go to this member.
    pub fn serves_clients(&self) -> bool {
        !self.is_learner() && !self.is_departed()
    }

    /// etcd's name for the member, once known.
    pub fn name(&self) -> Option<String> {
        self.name.lock().ok().and_then(|name| name.clone())
    }

    /// The etcd release the member last reported, once known.
    pub fn version(&self) -> Option<String> {
        self.version.lock().ok().and_then(|version| version.clone())
    }

    pub(super) fn set_version(&self, version: &str, endpoint: &str) {
        // An empty version says nothing: `/health` keeps showing the last one known, or null.
        if version.is_empty() {
            return;
        }
        let Ok(mut known) = self.version.lock() else { return };
        if known.as_deref() != Some(version) {
            if let Some(previous) = known.as_deref() {
                tracing::info!(member = endpoint, previous, version, "member now runs another etcd release");
            }
            *known = Some(version.to_owned());
        }
    }

    pub(super) fn set_learner(&self, learner: bool, endpoint: &str) {
        let was = self.learner.swap(learner, Relaxed);
        if was && !learner {
            tracing::info!(member = endpoint, "learner was promoted; it now gets client requests");
        } else if !was && learner {
            tracing::info!(member = endpoint, "member is a learner; it gets no client requests");
        }
    }

    pub(super) fn set_departed(&self, departed: bool, endpoint: &str) {
        if !self.departed.swap(departed, Relaxed) && departed {
            tracing::warn!(member = endpoint, "member is not in the cluster's member list; it gets no requests");
        }
    }
}

/// A copy of one member's routing facts, so that ordering is a pure function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberState {
    /// The last health check or request succeeded.
    pub healthy: bool,
    /// The member is a learner.
    pub learner: bool,
    /// The member left the cluster.
    pub departed: bool,
    /// etcd's member id, 0 while unknown.
    pub id: u64,
}
