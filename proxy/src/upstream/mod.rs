//! One etcd cluster behind the proxy: its members and the proxy's connections to them, which
//! of them are healthy, what the cluster view knows (leader, learners, members joined or gone),
//! and the routing rules built on that. The whole cluster is one value, [`Cluster`], which the
//! request path holds through one handle (`Arc<Cluster>`), so that two clusters can be run side
//! by side and switched between without touching the request path.
//!
//! Requests go to one preferred ("pinned") member, as etcd's own clients do, so that a client's
//! serializable reads keep seeing one member's history; the pin moves when that member fails.
//!
//! Each member has two connections, one per [`Lane`]: unary calls and the proxy's own health
//! checks on one, long-lived streams (Watch, keep-alives, snapshots) on the other. HTTP/2 flow
//! control is shared by all streams of a connection, so a stream whose client stops reading can
//! hold the others up; on separate connections, no stream can delay a unary call or a health
//! check, and a member is never judged by a stall of its clients' making.
//!
//! Depends on the transport, the configuration and TLS below it, never on the request path.

mod dial;
mod health;
mod member;
mod member_list;
mod routing;
mod view;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Endpoint};
use crate::error::UpstreamError;
use crate::transport::{ResponseFuture, Upload};

pub use member::{Member, MemberState};
pub use member_list::{rewrite_client_urls, MEMBER_LIST_HEADER};
pub use routing::{routing_error, RoutingError, Target};
pub use view::ClusterView;

/// Which of a member's two connections a request travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Unary calls and the proxy's own calls: one answer each.
    Calls = 0,
    /// Streams that live as long as their client wants.
    Streams = 1,
}

/// The set of members and how to reach them.
pub struct Cluster {
    /// Append-only (a member's `index` is its position); replaced as a whole when the cluster
    /// view discovers a member, so a request only pays for one read lock and an `Arc` clone.
    members: RwLock<Arc<Vec<Arc<Member>>>>,
    preferred: AtomicUsize,
    /// Replaced when the certificate files change (see `reload`), and as a whole when the
    /// cluster is switched; read at every dial.
    tls: RwLock<Option<Arc<crate::tls::Reloadable<rustls::ClientConfig>>>>,
    dial_timeout: Duration,
    /// Health-check period and stop signal, kept so that discovered members get checked too.
    health_checks: Mutex<Option<(Duration, CancellationToken)>>,
    /// Leader, learners and discovery (see [`ClusterView`]).
    pub view: ClusterView,
    /// Counts [`Cluster::switch_to`] calls, so that what a view refresh learned from the members
    /// it started with is not applied to the ones that replaced them.
    switches: AtomicUsize,
    /// Explains a member certificate the proxy refuses when it dials (see `explain`).
    explainer: crate::explain::Explainer,
}

impl Cluster {
    /// Creates the pool; no connection is made until [`Cluster::spawn_health_checks`] or the first
    /// request. Dial failures with a known cause are told to `explainer`.
    pub fn new(config: &Config, explainer: crate::explain::Explainer) -> Result<Arc<Self>, crate::tls::TlsError> {
        let tls = match &config.upstream_tls {
            Some(files) => Some(Arc::new(crate::tls::Reloadable::new(crate::tls::client_config(files)?))),
            None => None,
        };
        let members = config
            .endpoints
            .iter()
            .enumerate()
            .map(|(index, endpoint)| Arc::new(Member::new(endpoint, index)))
            .collect();
        Ok(Arc::new(Cluster {
            members: RwLock::new(Arc::new(members)),
            preferred: AtomicUsize::new(0),
            tls: RwLock::new(tls),
            dial_timeout: config.dial_timeout,
            health_checks: Mutex::new(None),
            view: ClusterView::new(config),
            switches: AtomicUsize::new(0),
            explainer,
        }))
    }

    /// All members: the `--endpoints` seeds in configuration order, then discovered ones.
    pub fn members(&self) -> Arc<Vec<Arc<Member>>> {
        match self.members.read() {
            Ok(members) => Arc::clone(&members),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Which member set a view refresh starts with (see [`Cluster::switch_to`]).
    pub(crate) fn member_set(&self) -> usize {
        self.switches.load(Relaxed)
    }

    /// Adds a member discovered from the member list of member set `set` and starts checking
    /// its health; returns the existing one if the endpoint is already known, and `None` if the
    /// cluster was switched since (the list describes a cluster the proxy no longer serves).
    pub fn add_member(self: &Arc<Self>, endpoint: &Endpoint, set: usize) -> Option<Arc<Member>> {
        let added = {
            let mut guard = match self.members.write() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            // Checked under the lock `switch_to` replaces the members under.
            if self.switches.load(Relaxed) != set {
                return None;
            }
            if let Some(known) = guard.iter().find(|m| m.endpoint == *endpoint) {
                return Some(Arc::clone(known));
            }
            let member = Arc::new(Member::new(endpoint, guard.len()));
            let mut members = Vec::clone(&guard);
            members.push(Arc::clone(&member));
            *guard = Arc::new(members);
            member
        };
        tracing::info!(member = %added.name, "etcd member discovered from the member list; sending it requests once healthy");
        let checks = self.health_checks.lock().ok().and_then(|c| c.clone());
        if let Some((interval, stop)) = checks {
            self.spawn_health_check(Arc::clone(&added), interval, stop);
        }
        Some(added)
    }

    #[cfg(test)]
    /// Members in the order a request should try them: healthy ones from the preferred one on,
    /// then the unhealthy ones (health information may be stale; trying beats failing).
    /// Learners and members that left the cluster are left out.
    pub fn attempt_order(&self) -> Vec<Arc<Member>> {
        self.attempt_order_for(Target::Voter)
    }

    /// Members in the order a request for `target` should try them (see [`Target`]).
    pub fn attempt_order_for(&self, target: Target) -> Vec<Arc<Member>> {
        let members = self.members();
        let states: Vec<MemberState> = members.iter().map(|m| m.state()).collect();
        routing::attempt_order(&states, self.preferred.load(Relaxed), self.view.leader(), target)
            .into_iter()
            .map(|i| Arc::clone(&members[i]))
            .collect()
    }

    /// The members a request for `target` tries, in the order of [`Cluster::attempt_order_for`];
    /// when the pinned member serves the request, as it usually does, nothing else is computed
    /// unless it fails.
    pub fn attempts(&self, target: Target) -> AttemptOrder<'_> {
        let first = match target {
            Target::Voter => self.pinned_voter(),
            _ => None,
        };
        AttemptOrder { upstream: self, target, first, tried: None, rest: None }
    }

    /// The pinned member, if it is a healthy voting member of the cluster: the first member of
    /// every ordinary request's attempt order.
    fn pinned_voter(&self) -> Option<Arc<Member>> {
        let members = self.members();
        let member = members.get(self.preferred.load(Relaxed))?;
        let state = member.state();
        (state.healthy && !state.learner && !state.departed).then(|| Arc::clone(member))
    }

    /// Whether any member is currently healthy.
    pub fn any_healthy(&self) -> bool {
        self.members().iter().any(|m| m.is_healthy() && m.role.serves_clients())
    }

    /// Opens a stream for a request to `member` on `lane`, with `upload` as its body: the one way
    /// every request reaches a member (forwarded calls, keep-alive streams, the proxy's own
    /// calls). Nothing was sent when it fails.
    pub async fn open(
        &self,
        member: &Member,
        lane: Lane,
        path_and_query: &http::uri::PathAndQuery,
        headers: &HeaderMap,
        upload: Upload,
    ) -> Result<(ResponseFuture, Option<h2::SendStream<Bytes>>), UpstreamError> {
        let mut connection = self.connection(member, lane).await?;
        // Waiting for capacity before taking the body keeps a client stream usable for the next member.
        connection
            .ready()
            .await
            .map_err(|source| UpstreamError::NotSent { endpoint: member.endpoint.url(), source })?;
        let mut request = Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = member
            .uri(path_and_query.clone())
            .map_err(|e| UpstreamError::Request { why: format!("cannot address {path_and_query}: {e}") })?;
        *request.headers_mut() = headers.clone();
        member.stats.requests.fetch_add(1, Relaxed);
        connection
            .send(request, upload)
            .map_err(|source| UpstreamError::NotSent { endpoint: member.endpoint.url(), source })
    }

    /// Serves every later request from the members at `endpoints`, dialled with `tls`, instead
    /// of the current ones (a migration's cutover). The current members' connections are
    /// closed, so that streams on them (Watch, keep-alives) resume on the new members; calls in
    /// flight on them fail over as after any member failure.
    pub fn switch_to(self: &Arc<Self>, endpoints: &[Endpoint], tls: Option<Arc<rustls::ClientConfig>>) {
        let replacements: Vec<Arc<Member>> =
            endpoints.iter().enumerate().map(|(index, endpoint)| Arc::new(Member::new(endpoint, index))).collect();
        {
            let mut guard = match self.tls.write() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            *guard = tls.map(|config| Arc::new(crate::tls::Reloadable::new(config)));
        }
        let retired = {
            let mut guard = match self.members.write() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            self.preferred.store(0, Relaxed);
            self.switches.fetch_add(1, Relaxed);
            std::mem::replace(&mut *guard, Arc::new(replacements.clone()))
        };
        self.view.forget_leader();
        // Until their first health check, the new members are tried anyway (see `attempt_order`);
        // marking them healthy at once lets the pinned member take requests without waiting.
        for member in &replacements {
            self.mark_healthy(member);
        }
        let checks = self.health_checks.lock().ok().and_then(|c| c.clone());
        if let Some((interval, stop)) = checks {
            for member in &replacements {
                self.spawn_health_check(Arc::clone(member), interval, stop.clone());
            }
        }
        for member in retired.iter() {
            member.retired.cancel();
        }
        tracing::info!(
            members = %endpoints.iter().map(|e| e.url()).collect::<Vec<_>>().join(","),
            "the proxy now serves clients from another cluster"
        );
        self.refresh_in_background();
    }

    /// `--dial-timeout`, which also bounds the cluster view's own calls.
    pub(crate) fn dial_timeout(&self) -> Duration {
        self.dial_timeout
    }
}

/// The members one request tries, in order (see [`Cluster::attempts`]).
pub struct AttemptOrder<'a> {
    upstream: &'a Cluster,
    target: Target,
    /// The pinned member, not yet tried.
    first: Option<Arc<Member>>,
    /// The pinned member once tried, left out of the rest.
    tried: Option<Arc<Member>>,
    rest: Option<std::vec::IntoIter<Arc<Member>>>,
}

impl AttemptOrder<'_> {
    /// Goes on with `members` instead (after a routing error, once the view was refreshed).
    pub fn restart_with(&mut self, members: Vec<Arc<Member>>) {
        self.first = None;
        self.rest = Some(members.into_iter());
    }
}

impl Iterator for AttemptOrder<'_> {
    type Item = Arc<Member>;

    fn next(&mut self) -> Option<Arc<Member>> {
        if let Some(first) = self.first.take() {
            self.tried = Some(Arc::clone(&first));
            return Some(first);
        }
        let (upstream, target, tried) = (self.upstream, self.target, self.tried.take());
        let rest = self.rest.get_or_insert_with(|| {
            let mut order = upstream.attempt_order_for(target);
            if let Some(tried) = tried {
                order.retain(|member| !Arc::ptr_eq(member, &tried));
            }
            order.into_iter()
        });
        rest.next()
    }
}

/// A member as a member list names it (`m<id>`, one peer URL), for tests.
#[cfg(test)]
pub(crate) fn listed(id: u64, urls: &[&str], learner: bool) -> etcd_compat_proto::etcdserverpb::Member {
    etcd_compat_proto::etcdserverpb::Member {
        id,
        name: format!("m{id}"),
        peer_ur_ls: vec![format!("http://127.0.0.1:{}", 9000 + id)],
        client_ur_ls: urls.iter().map(|u| u.to_string()).collect(),
        is_learner: learner,
    }
}
