//! Logs that explain: when a call ends with one of the statuses the field reports describe, or
//! a member serves a certificate the proxy refuses, one warning names the likely cause and the
//! command that helps, at most once a minute per cause.
//!
//! An operator reading `etcdserver: mvcc: database space exceeded` a thousand times learns
//! nothing new from the thousand-and-first; one line a minute that says what to run does more.
//! Callers only come here for statuses that are not OK, so the hot path pays one comparison.
//! What is logged is fixed text, the method's path, a member's URL, and for repeated failed
//! logins the user name: never a password, a token or a request's payload.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::etcd_errors;
use crate::grpc::Code;

/// How often one cause may be explained: once per this interval at most.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(60);

/// Failed logins within [`REPEAT_INTERVAL`] before they are explained: one is a typo.
pub const LOGIN_FAILURE_THRESHOLD: usize = 5;

/// Longest user name quoted in a log line; longer names are cut (a client chooses them).
const MAX_USER_NAME: usize = 64;

/// The member changes a follower forwards to the leader (where etcd issue 14070 bites).
const MEMBER_CHANGES: [&str; 4] = [
    "/etcdserverpb.Cluster/MemberAdd",
    "/etcdserverpb.Cluster/MemberRemove",
    "/etcdserverpb.Cluster/MemberUpdate",
    "/etcdserverpb.Cluster/MemberPromote",
];

/// A likely cause behind a status or a dial failure, each explained in one fixed sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The database reached its quota: every write fails (NOSPACE).
    NoSpace,
    /// A member change timed out.
    MemberChangeTimedOut,
    /// A call reached a learner.
    LearnerCalled,
    /// A learner promoted before it caught up.
    LearnerNotInSync,
    /// A learner added while one already exists.
    TooManyLearners,
    /// A voting member promoted as if it were a learner.
    NotALearner,
    /// A member too far behind in applying its log.
    TooManyRequests,
    /// Several failed logins within a minute.
    LoginFailures,
    /// The proxy refused the TLS certificate a member served.
    MemberCertificate,
}

/// Every cause, in the order of their rate-limit slots.
const ALL_CAUSES: [Cause; 9] = [
    Cause::NoSpace,
    Cause::MemberChangeTimedOut,
    Cause::LearnerCalled,
    Cause::LearnerNotInSync,
    Cause::TooManyLearners,
    Cause::NotALearner,
    Cause::TooManyRequests,
    Cause::LoginFailures,
    Cause::MemberCertificate,
];

impl Cause {
    /// The value of the log line's `cause` field: stable, for alerts and log searches.
    pub fn label(self) -> &'static str {
        match self {
            Cause::NoSpace => "nospace",
            Cause::MemberChangeTimedOut => "member_change_timeout",
            Cause::LearnerCalled => "learner_called",
            Cause::LearnerNotInSync => "learner_not_in_sync",
            Cause::TooManyLearners => "too_many_learners",
            Cause::NotALearner => "not_a_learner",
            Cause::TooManyRequests => "too_many_requests",
            Cause::LoginFailures => "login_failures",
            Cause::MemberCertificate => "member_certificate",
        }
    }

    /// The log line: what etcd (or the TLS handshake) said, the likely cause, the command that helps.
    pub fn explanation(self) -> &'static str {
        match self {
            Cause::NoSpace => {
                "etcd refused a write with \"mvcc: database space exceeded\": the cluster's database reached \
                 its quota (NOSPACE alarm) and every write fails until space is recovered; run \
                 `etcd-compat-proxy recover-space` (compact, defragment each member, disarm the alarm); \
                 `etcd-compat-proxy doctor` shows the database size against the quota"
            }
            Cause::MemberChangeTimedOut => {
                "etcd answered a member change with \"request timed out\": with auth on, a follower forwards \
                 member changes to the leader without the caller's credentials and the leader drops them \
                 (etcd issue 14070), or the cluster has no quorum; run `etcd-compat-proxy doctor` to see \
                 the leader, each member's health and whether auth is on"
            }
            Cause::LearnerCalled => {
                "etcd refused a call with \"rpc not supported for learner\": a client reached a learner (a \
                 member added with --learner and not promoted yet, often put in a client's endpoint list \
                 by auto-sync); point clients at the proxy or at voting members, and run \
                 `etcd-compat-proxy doctor` to see which members are learners"
            }
            Cause::LearnerNotInSync => {
                "etcd refused to promote a learner \"which is in sync with leader\": the learner has not \
                 caught up with the leader's log yet (a large database to copy, or a learner that cannot \
                 reach the leader); retry the promotion later, and run `etcd-compat-proxy doctor` to see \
                 the learner's health"
            }
            Cause::TooManyLearners => {
                "etcd refused to add a learner with \"too many learner members in cluster\": the cluster \
                 already has a learner, perhaps one added earlier and never promoted; promote or remove it \
                 first, and run `etcd-compat-proxy doctor` to see it"
            }
            Cause::NotALearner => {
                "etcd refused a promotion with \"can only promote a learner member\": the member is already \
                 a voting member (promoted earlier, or the wrong member ID); run `etcd-compat-proxy doctor` \
                 to see which members are learners"
            }
            Cause::TooManyRequests => {
                "etcd refused a call with \"too many requests\": a member applies committed entries more \
                 than 5000 behind its log, usually because it is overloaded (slow disk: WAL syncs and \
                 backend commits that take too long); clients must slow down, and \
                 `etcd-compat-proxy doctor` shows each member's performance"
            }
            Cause::LoginFailures => {
                "etcd refused several logins within a minute with \"authentication failed, invalid user ID \
                 or password\": a client is configured with a wrong user name or password (or is guessing \
                 them); fix the client's credentials, and run `etcd-compat-proxy doctor` to check the \
                 cluster's auth"
            }
            Cause::MemberCertificate => {
                "the proxy refused the TLS certificate a member served: it has expired, is not signed by a \
                 CA in --cacert, or does not name the member's address (a renewal not yet in place, or a \
                 new CA not yet trusted); run `etcd-compat-proxy certs inspect --endpoints` with the \
                 member's URL (the `endpoint` field) to see what it serves, and `etcd-compat-proxy doctor` \
                 to check every member"
            }
        }
    }

    fn slot(self) -> usize {
        ALL_CAUSES.iter().position(|cause| *cause == self).unwrap_or(0)
    }
}

/// The cause behind a status etcd gave a call of `method_path`, if it is one the field reports
/// describe. Failed logins are a cause only when repeated (see [`Explainer::login_refused`]).
pub fn classify(method_path: &str, code: Code, message: &str) -> Option<Cause> {
    let cause = match (code, message) {
        (Code::ResourceExhausted, etcd_errors::NO_SPACE) => Cause::NoSpace,
        (Code::ResourceExhausted, etcd_errors::TOO_MANY_REQUESTS) => Cause::TooManyRequests,
        (Code::Unavailable, etcd_errors::LEARNER) => Cause::LearnerCalled,
        (Code::FailedPrecondition, etcd_errors::LEARNER_NOT_READY) => Cause::LearnerNotInSync,
        (Code::FailedPrecondition, etcd_errors::TOO_MANY_LEARNERS) => Cause::TooManyLearners,
        (Code::FailedPrecondition, etcd_errors::MEMBER_NOT_LEARNER) => Cause::NotALearner,
        (Code::InvalidArgument, etcd_errors::AUTH_FAILED) => Cause::LoginFailures,
        // Elsewhere a timeout says nothing this module can name: a slow disk, a lost quorum.
        (Code::Unavailable, message)
            if message.starts_with(etcd_errors::REQUEST_TIMED_OUT) && MEMBER_CHANGES.contains(&method_path) =>
        {
            Cause::MemberChangeTimedOut
        }
        _ => return None,
    };
    Some(cause)
}

/// Whether a failed TLS handshake with a member is the proxy refusing the member's certificate.
pub fn refuses_member_certificate(error: &std::io::Error) -> bool {
    let rustls_error = error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    matches!(rustls_error, Some(rustls::Error::InvalidCertificate(_)))
}

/// Says what the field-report signatures mean, once per cause per interval. Cheap to clone
/// (clones share their state) and safe to use from every worker thread.
#[derive(Clone)]
pub struct Explainer {
    shared: Arc<Shared>,
}

struct Shared {
    interval: Duration,
    /// What the rate-limit slots count from: a monotonic clock, never the wall clock.
    origin: Instant,
    /// Per cause: when it was last said, in nanoseconds after `origin` plus one; 0 for never.
    last_said: [AtomicU64; ALL_CAUSES.len()],
    /// The latest failed logins (at most the threshold's worth), with their user names.
    login_failures: Mutex<VecDeque<(Instant, Box<str>)>>,
}

impl Default for Explainer {
    fn default() -> Self {
        Explainer::with_interval(REPEAT_INTERVAL)
    }
}

/// What a log line may name besides its cause.
#[derive(Default)]
struct Detail<'a> {
    method: Option<&'a str>,
    endpoint: Option<&'a str>,
    user: Option<&'a str>,
    error: Option<String>,
}

impl Explainer {
    /// An explainer that says each cause at most once per `interval` (and counts failed logins
    /// within it); [`REPEAT_INTERVAL`] outside tests.
    pub fn with_interval(interval: Duration) -> Explainer {
        Explainer {
            shared: Arc::new(Shared {
                interval,
                origin: Instant::now(),
                last_said: Default::default(),
                login_failures: Mutex::new(VecDeque::with_capacity(LOGIN_FAILURE_THRESHOLD)),
            }),
        }
    }

    /// Looks at the final status of a client's call of `method` (an index into the method
    /// table); logs its cause if it has one and it was not said within the interval.
    pub fn call_ended(&self, method: usize, code: Code, message: &str) {
        self.call_ended_at(method, code, message, Instant::now());
    }

    fn call_ended_at(&self, method: usize, code: Code, message: &str, now: Instant) -> Option<Cause> {
        if code == Code::Ok {
            return None;
        }
        let path = etcd_compat_proto::METHODS.get(method).map_or("", |m| m.path);
        match classify(path, code, message)? {
            // Counted where logins are checked, which knows the user (see `login_refused`).
            Cause::LoginFailures => None,
            cause => self.say(cause, now, Detail { method: Some(path), ..Detail::default() }).then_some(cause),
        }
    }

    /// Counts a login etcd refused for a wrong user name or password; explains once
    /// [`LOGIN_FAILURE_THRESHOLD`] of them fall within the interval. The user is named when
    /// all of those were for the same one.
    pub fn login_refused(&self, user: &str) {
        self.login_refused_at(user, Instant::now());
    }

    /// Whether the failed login was explained, and the user it named.
    fn login_refused_at(&self, user: &str, now: Instant) -> Option<Option<Box<str>>> {
        let user: Box<str> = user.chars().take(MAX_USER_NAME).collect::<String>().into();
        let same_user = {
            let mut failures = self.shared.login_failures.lock().ok()?;
            failures.push_back((now, user));
            while failures.len() > LOGIN_FAILURE_THRESHOLD
                || failures.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.shared.interval)
            {
                failures.pop_front();
            }
            if failures.len() < LOGIN_FAILURE_THRESHOLD {
                return None;
            }
            let first = failures.front().map(|(_, user)| user.clone()).unwrap_or_default();
            failures.iter().all(|(_, user)| *user == first).then_some(first)
        };
        self.say(Cause::LoginFailures, now, Detail { user: same_user.as_deref(), ..Detail::default() })
            .then_some(same_user)
    }

    /// Looks at a failed TLS handshake with the member at `endpoint`: a certificate the proxy
    /// refused is explained.
    pub fn tls_handshake_failed(&self, endpoint: &str, error: &std::io::Error) {
        self.tls_handshake_failed_at(endpoint, error, Instant::now());
    }

    fn tls_handshake_failed_at(&self, endpoint: &str, error: &std::io::Error, now: Instant) -> bool {
        refuses_member_certificate(error)
            && self.say(
                Cause::MemberCertificate,
                now,
                Detail { endpoint: Some(endpoint), error: Some(error.to_string()), ..Detail::default() },
            )
    }

    /// Logs `cause` unless it was said within the interval; whether it was logged.
    fn say(&self, cause: Cause, now: Instant, detail: Detail<'_>) -> bool {
        if !self.may_say(cause, now) {
            return false;
        }
        let Detail { method, endpoint, user, error } = detail;
        tracing::warn!(
            cause = cause.label(),
            method,
            endpoint,
            user,
            error,
            repeats = "at most once a minute",
            "{}",
            cause.explanation()
        );
        true
    }

    /// Takes `cause`'s slot for `now` if it was last taken an interval or more before.
    fn may_say(&self, cause: Cause, now: Instant) -> bool {
        let shared = &self.shared;
        let at = u64::try_from(now.saturating_duration_since(shared.origin).as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        let interval = u64::try_from(shared.interval.as_nanos()).unwrap_or(u64::MAX);
        let slot = &shared.last_said[cause.slot()];
        let mut last = slot.load(Relaxed);
        loop {
            // A thread that read the clock earlier than the last taker's sees a difference of 0.
            if last != 0 && at.saturating_sub(last) < interval {
                return false;
            }
            match slot.compare_exchange_weak(last, at, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(seen) => last = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(path: &str) -> usize {
        etcd_compat_proto::METHODS.iter().position(|m| m.path == path).unwrap()
    }

    const PUT: &str = "/etcdserverpb.KV/Put";

    #[test]
    fn each_cause_is_classified_from_etcds_exact_message() {
        let cases = [
            (PUT, Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded", Cause::NoSpace),
            (PUT, Code::ResourceExhausted, "etcdserver: too many requests", Cause::TooManyRequests),
            (
                "/etcdserverpb.KV/Range",
                Code::Unavailable,
                "etcdserver: rpc not supported for learner",
                Cause::LearnerCalled,
            ),
            (
                "/etcdserverpb.Cluster/MemberPromote",
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member which is in sync with leader",
                Cause::LearnerNotInSync,
            ),
            (
                "/etcdserverpb.Cluster/MemberAdd",
                Code::FailedPrecondition,
                "etcdserver: too many learner members in cluster",
                Cause::TooManyLearners,
            ),
            (
                "/etcdserverpb.Cluster/MemberPromote",
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member",
                Cause::NotALearner,
            ),
            (
                "/etcdserverpb.Auth/Authenticate",
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
                Cause::LoginFailures,
            ),
        ];
        for (path, code, message, cause) in cases {
            assert_eq!(classify(path, code, message), Some(cause), "{message}");
        }
        for path in MEMBER_CHANGES {
            for message in [
                "etcdserver: request timed out",
                "etcdserver: request timed out, possibly due to previous leader failure",
            ] {
                assert_eq!(classify(path, Code::Unavailable, message), Some(Cause::MemberChangeTimedOut), "{path}");
            }
        }
    }

    #[test]
    fn other_statuses_are_not_classified() {
        let cases = [
            (PUT, Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
            (PUT, Code::Unavailable, "etcdserver: request timed out"),
            ("/etcdserverpb.Cluster/MemberList", Code::Unavailable, "etcdserver: request timed out"),
            (PUT, Code::ResourceExhausted, "grpc: received message larger than max (5000000 vs. 2097152)"),
            (PUT, Code::Unavailable, "etcdserver: mvcc: database space exceeded, but not quite"),
            (PUT, Code::Unknown, "etcdserver: mvcc: database space exceeded"),
            (PUT, Code::Unauthenticated, "etcdserver: invalid auth token"),
        ];
        for (path, code, message) in cases {
            assert_eq!(classify(path, code, message), None, "{path} {message}");
        }
    }

    #[test]
    fn every_explanation_names_a_command_and_a_distinct_label() {
        let mut labels: Vec<_> = ALL_CAUSES.iter().map(|cause| cause.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), ALL_CAUSES.len());
        for cause in ALL_CAUSES {
            assert!(cause.explanation().contains("`etcd-compat-proxy "), "{cause:?}");
            assert_eq!(ALL_CAUSES[cause.slot()], cause);
        }
        assert!(Cause::NoSpace.explanation().contains("recover-space"));
        assert!(Cause::MemberCertificate.explanation().contains("certs inspect --endpoints"));
    }

    #[test]
    fn a_cause_is_said_once_per_interval() {
        let explainer = Explainer::with_interval(Duration::from_secs(60));
        let start = Instant::now();
        let nospace = |at: Duration| {
            explainer.call_ended_at(index(PUT), Code::ResourceExhausted, etcd_errors::NO_SPACE, start + at)
        };
        assert_eq!(nospace(Duration::ZERO), Some(Cause::NoSpace));
        for seconds in [0, 1, 30, 59] {
            assert_eq!(nospace(Duration::from_secs(seconds)), None, "said again after {seconds} s");
        }
        // Another cause has a slot of its own.
        let busy = explainer.call_ended_at(
            index(PUT),
            Code::ResourceExhausted,
            etcd_errors::TOO_MANY_REQUESTS,
            start + Duration::from_secs(1),
        );
        assert_eq!(busy, Some(Cause::TooManyRequests));
        assert_eq!(nospace(Duration::from_secs(60)), Some(Cause::NoSpace));
        assert_eq!(nospace(Duration::from_secs(61)), None);
        assert_eq!(nospace(Duration::from_secs(125)), Some(Cause::NoSpace));
        // OK, unclassified, and failed logins (counted elsewhere) say nothing here.
        let later = start + Duration::from_secs(500);
        assert_eq!(explainer.call_ended_at(index(PUT), Code::Ok, "", later), None);
        assert_eq!(explainer.call_ended_at(index(PUT), Code::Unavailable, "etcdserver: no leader", later), None);
        let login = index("/etcdserverpb.Auth/Authenticate");
        assert_eq!(explainer.call_ended_at(login, Code::InvalidArgument, etcd_errors::AUTH_FAILED, later), None);
    }

    #[test]
    fn the_rate_limit_holds_across_threads() {
        let explainer = Explainer::default();
        let now = Instant::now();
        let said: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let explainer = explainer.clone();
                    scope.spawn(move || {
                        (0..1000)
                            .filter(|_| {
                                explainer
                                    .call_ended_at(index(PUT), Code::ResourceExhausted, etcd_errors::NO_SPACE, now)
                                    .is_some()
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|handle| handle.join().unwrap()).sum()
        });
        assert_eq!(said, 1);
    }

    #[test]
    fn failed_logins_are_explained_only_after_the_threshold() {
        let explainer = Explainer::with_interval(Duration::from_secs(60));
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        // Four failures, then a fifth after the four have left the window.
        for second in 0..4 {
            assert_eq!(explainer.login_refused_at("alice", at(second)), None);
        }
        for second in 70..74 {
            assert_eq!(explainer.login_refused_at("alice", at(second)), None);
        }
        // Five within a minute: said once, naming the one user they were all for.
        assert_eq!(explainer.login_refused_at("alice", at(74)), Some(Some("alice".into())));
        for second in 75..80 {
            assert_eq!(explainer.login_refused_at("bob", at(second)), None, "said again at {second} s");
        }
        // Said again after the interval, without a name: the five were not all for one user.
        assert_eq!(explainer.login_refused_at("carol", at(134)), Some(None));
        assert_eq!(explainer.login_refused_at("carol", at(135)), None);
        // Client-chosen names are cut.
        let long = "x".repeat(1000);
        for second in 300..304 {
            assert_eq!(explainer.login_refused_at(&long, at(second)), None);
        }
        let named = explainer.login_refused_at(&long, at(304)).flatten().unwrap_or_default();
        assert_eq!(named.len(), MAX_USER_NAME);
    }

    #[test]
    fn only_a_refused_member_certificate_is_explained() {
        let explainer = Explainer::default();
        let now = Instant::now();
        let refused = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
        );
        assert!(!explainer.tls_handshake_failed_at("https://10.0.0.1:2379", &reset, now));
        assert!(!explainer.tls_handshake_failed_at("https://10.0.0.1:2379", &alert, now));
        assert!(explainer.tls_handshake_failed_at("https://10.0.0.1:2379", &refused, now));
        assert!(!explainer.tls_handshake_failed_at("https://10.0.0.2:2379", &refused, now));
    }
}
