//! Auth sessions: clients never see an etcd token expire, nor one that a member joined later
//! does not know.
//!
//! etcd's tokens expire (simple tokens after `--auth-token-ttl` of idleness on each member, JWTs
//! at a fixed time), are unknown to members that joined after they were issued, and old clients
//! handle none of that. So the proxy owns upstream identity: a client authenticates to the proxy,
//! which checks the credentials with etcd and hands out a token of its own: the session itself,
//! [`sealed`] under keys every replica may share, so that any of them (and the same process after
//! a restart) can open it. Behind that token stands a [`Session`] for the etcd user, whose upstream token the proxy renews before it expires
//! (JWT) and whenever etcd rejects it, retrying the rejected request once. etcd's RBAC still
//! applies per user because every request goes up as that user.
//!
//! Client tokens never reach etcd; etcd tokens and passwords never reach a client, a log line, a
//! metric or an error message. [`throttle`] slows password guessing down. Holds no connection:
//! the request path asks etcd for tokens and hands them in, so this depends only on [`crate::grpc`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::error::ProxyFailure;
use crate::etcd_errors;
use crate::grpc::Code;

pub use sealed::parse_key_file;
use sealed::SessionKeys;
use throttle::LoginThrottle;
pub use throttle::LoginTurn;

mod sealed;
mod throttle;

/// The metadata key etcd reads a token from.
pub const TOKEN_HEADER: HeaderName = HeaderName::from_static("token");
/// The other key etcd reads a token from when `token` is absent (its HTTP gateway's spelling).
pub const AUTHORIZATION_HEADER: HeaderName = http::header::AUTHORIZATION;
/// A password held in memory only, overwritten when dropped, never printed.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps the password's bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    /// The password, for the one place that sends it to etcd.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// An etcd user name and password.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The etcd user.
    pub user: String,
    /// Its password.
    pub password: Secret,
}

/// The etcd token a session currently sends, and when it should be renewed.
#[derive(Clone)]
pub struct UpstreamToken {
    /// `None` until the session first authenticated.
    value: Option<HeaderValue>,
    /// Bumped on every renewal, so that concurrent callers renew a rejected token only once.
    generation: u64,
    /// Renew before this moment (JWTs carry their expiry; simple tokens expire on idleness).
    renew_after: Option<Instant>,
}

impl UpstreamToken {
    /// Which renewal this token came from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn is_due(&self) -> bool {
        self.value.is_none() || self.renew_after.is_some_and(|at| Instant::now() >= at)
    }
}

/// One etcd identity and the token the proxy holds for it.
pub struct Session {
    credentials: Credentials,
    token: RwLock<UpstreamToken>,
    /// Held while authenticating, so concurrent callers wait for one renewal instead of each making their own.
    renewing: tokio::sync::Mutex<()>,
    /// Seconds since [`AuthSessions::started`] of the last use, for idle expiry.
    last_used: AtomicU64,
    /// Opened by a client's Authenticate (rather than configured): when etcd refuses its
    /// credentials later, the client is told to authenticate again.
    issued: bool,
    /// etcd refused the credentials (a changed password): the token no longer opens a session.
    revoked: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").field("user", &self.credentials.user).finish_non_exhaustive()
    }
}

/// What etcd said to an Authenticate call made by the proxy.
pub enum Authenticated {
    /// The token etcd issued.
    Token(String),
    /// etcd refused or failed; the status goes to whoever needed the token.
    Refused(Code, String),
}

impl Session {
    fn new(credentials: Credentials, token: Option<String>, issued: bool) -> Self {
        let upstream = match token {
            Some(token) => upstream_token(&token, 0),
            None => UpstreamToken { value: None, generation: 0, renew_after: None },
        };
        Session {
            credentials,
            token: RwLock::new(upstream),
            renewing: tokio::sync::Mutex::new(()),
            last_used: AtomicU64::new(0),
            issued,
            revoked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks a client's session whose credentials etcd refused: its token is refused from now on.
    pub fn revoke(&self) {
        if self.issued {
            self.revoked.store(true, Relaxed);
        }
    }

    /// Whether a client's Authenticate opened this session.
    pub fn issued_to_client(&self) -> bool {
        self.issued
    }

    /// The etcd user this session acts as.
    pub fn user(&self) -> &str {
        &self.credentials.user
    }

    fn current(&self) -> UpstreamToken {
        match self.token.read() {
            Ok(token) => token.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A token to send now: the current one, renewed first if it is due or was rejected
    /// (`rejected` is the generation etcd refused). `authenticate` asks etcd for a new token.
    pub async fn token<F, Fut>(&self, rejected: Option<u64>, authenticate: F) -> Result<UpstreamToken, (Code, String)>
    where
        F: FnOnce(Credentials) -> Fut,
        Fut: Future<Output = Authenticated>,
    {
        let current = self.current();
        let stale = |token: &UpstreamToken| token.is_due() || rejected == Some(token.generation);
        if !stale(&current) {
            return Ok(current);
        }
        let _renewing = self.renewing.lock().await;
        // Another caller may have renewed while this one waited.
        let current = self.current();
        if !stale(&current) {
            return Ok(current);
        }
        match authenticate(self.credentials.clone()).await {
            Authenticated::Token(token) => {
                let renewed = upstream_token(&token, current.generation + 1);
                match self.token.write() {
                    Ok(mut slot) => *slot = renewed.clone(),
                    Err(poisoned) => *poisoned.into_inner() = renewed.clone(),
                }
                tracing::debug!(user = %self.credentials.user, generation = renewed.generation, "renewed the etcd token");
                Ok(renewed)
            }
            Authenticated::Refused(code, message) => Err((code, message)),
        }
    }

    /// Puts the session's etcd token into request headers.
    pub fn authorize(token: &UpstreamToken, headers: &mut HeaderMap) {
        match &token.value {
            Some(value) => {
                headers.insert(TOKEN_HEADER, value.clone());
            }
            None => {
                headers.remove(&TOKEN_HEADER);
            }
        }
    }
}

/// The header value of an etcd token, marked sensitive so that HTTP/2 never indexes it.
fn upstream_token(token: &str, generation: u64) -> UpstreamToken {
    let value = HeaderValue::from_str(token).ok().map(|mut value| {
        value.set_sensitive(true);
        value
    });
    UpstreamToken { value, generation, renew_after: jwt_renewal_time(token) }
}

/// For a JWT, the moment at 3/4 of its remaining lifetime; `None` for simple tokens, which
/// expire on idleness and are renewed when etcd rejects them.
fn jwt_renewal_time(token: &str) -> Option<Instant> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let json = std::str::from_utf8(&json).ok()?;
    let after_key = &json[json.find("\"exp\"")? + 5..];
    let digits: String = after_key.trim_start_matches([':', ' ']).chars().take_while(|c| c.is_ascii_digit()).collect();
    let expires = UNIX_EPOCH + Duration::from_secs(digits.parse().ok()?);
    let left = expires.duration_since(SystemTime::now()).unwrap_or_default();
    Some(Instant::now() + left * 3 / 4)
}

/// Who a request acts as, by the proxy's rules.
pub enum Identity {
    /// A proxy token's session or a configured identity.
    Session(Arc<Session>),
    /// No token and no configured identity: the request goes to etcd without a token.
    Anonymous,
    /// A token the proxy did not issue or no longer knows (expired, or issued before a restart).
    UnknownToken,
}

/// What the transport knows about the client, attached to each request by the listener.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// The client's address, when the listener knows it.
    pub addr: Option<IpAddr>,
    /// The CN of the client certificate, for mTLS clients.
    pub common_name: Option<String>,
    /// The answers its connection has not taken yet.
    pub unread: Option<Arc<crate::transport::UnreadAnswers>>,
}

/// Identities configured for clients that never authenticate.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Used by clients that send no token.
    pub default_identity: Option<Credentials>,
    /// By client-certificate CN, checked before the default identity.
    pub cn_identities: Vec<(String, Credentials)>,
    /// Proxy tokens unused for this long are forgotten.
    pub session_idle_timeout: Duration,
    /// Longest delay of a login from an address whose logins keep failing.
    pub max_login_delay: Duration,
    /// `--session-key-file` and the keys read from it at startup; `None`: a random key per process.
    pub session_keys: Option<(std::path::PathBuf, Vec<Secret>)>,
}

/// Every session of the process, by proxy token, plus the configured identities.
pub struct AuthSessions {
    /// Sessions opened in this process or from a sealed token it was shown: a cache, since any
    /// token the keys open stands for its session.
    by_token: Mutex<HashMap<String, Arc<Session>>>,
    keys: SessionKeys,
    default_identity: Option<Arc<Session>>,
    cn_identities: HashMap<String, Arc<Session>>,
    idle_timeout: Duration,
    started: Instant,
    logins: LoginThrottle,
}

impl AuthSessions {
    /// Builds the session table from configuration; fails only if the crypto provider does.
    pub fn new(config: AuthConfig) -> Result<Self, String> {
        let keys = match &config.session_keys {
            Some((_, secrets)) => SessionKeys::new(secrets),
            None => SessionKeys::random(),
        };
        let keys = keys.ok_or("the crypto provider could not make the session token keys")?;
        Ok(AuthSessions {
            by_token: Mutex::new(HashMap::new()),
            keys,
            default_identity: config.default_identity.map(|c| Arc::new(Session::new(c, None, false))),
            cn_identities: config
                .cn_identities
                .into_iter()
                .map(|(cn, credentials)| (cn, Arc::new(Session::new(credentials, None, false))))
                .collect(),
            idle_timeout: config.session_idle_timeout,
            started: Instant::now(),
            logins: LoginThrottle::new(config.max_login_delay),
        })
    }

    fn now_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Decides who a request acts as: its proxy token, else its certificate's CN, else the
    /// default identity, else nobody.
    pub fn identify(&self, headers: &HeaderMap, client: Option<&ClientInfo>) -> Identity {
        // etcd reads `authorization` when `token` is absent: both are the client's token.
        if let Some(token) = headers.get(&TOKEN_HEADER).or_else(|| headers.get(&AUTHORIZATION_HEADER)) {
            return match token.to_str().ok().and_then(|token| self.session_of(token)) {
                Some(session) => {
                    session.last_used.store(self.now_secs(), Relaxed);
                    Identity::Session(session)
                }
                None => Identity::UnknownToken,
            };
        }
        let by_cn = client.and_then(|c| c.common_name.as_ref()).and_then(|cn| self.cn_identities.get(cn));
        match by_cn.or(self.default_identity.as_ref()) {
            Some(session) => Identity::Session(Arc::clone(session)),
            None => Identity::Anonymous,
        }
    }

    /// The live session of `token`: cached, or opened from the token itself (issued by another
    /// replica, or by this process before a restart).
    fn session_of(&self, token: &str) -> Option<Arc<Session>> {
        let mut sessions = self.by_token.lock().ok()?;
        if let Some(session) = sessions.get(token) {
            return (!session.revoked.load(Relaxed)).then(|| Arc::clone(session));
        }
        let credentials = self.keys.open(token)?;
        let session = Arc::new(Session::new(credentials, None, true));
        sessions.insert(token.to_owned(), Arc::clone(&session));
        Some(session)
    }

    /// Opens a session for credentials etcd just accepted with `token`; returns the proxy token.
    pub fn open(&self, credentials: Credentials, token: String) -> Result<String, (Code, String)> {
        let issued_at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let proxy_token = self.keys.seal(&credentials, issued_at).ok_or_else(|| ProxyFailure::RandomFailed.status())?;
        let session = Arc::new(Session::new(credentials, Some(token), true));
        session.last_used.store(self.now_secs(), Relaxed);
        if let Ok(mut sessions) = self.by_token.lock() {
            sessions.insert(proxy_token.clone(), session);
        }
        Ok(proxy_token)
    }

    /// Replaces the session keys (a changed `--session-key-file`): the first seals from now on,
    /// and tokens no remaining key opens are refused. Cached sessions are forgotten so that each
    /// token is checked against the new keys.
    pub fn replace_keys(&self, secrets: &[Secret]) -> bool {
        if !self.keys.replace(secrets) {
            return false;
        }
        if let Ok(mut sessions) = self.by_token.lock() {
            sessions.clear();
        }
        true
    }

    /// Waits until a login from `addr` may be checked with etcd (see [`LoginThrottle`]).
    pub async fn admit_login(&self, addr: Option<IpAddr>) -> LoginTurn<'_> {
        self.logins.admit(addr).await
    }

    /// Forgets sessions idle for longer than the configured timeout and old login failures.
    pub fn expire_idle(&self) {
        let now = self.now_secs();
        let idle = self.idle_timeout.as_secs();
        if let Ok(mut sessions) = self.by_token.lock() {
            sessions.retain(|_, session| now.saturating_sub(session.last_used.load(Relaxed)) < idle);
        }
        self.logins.forget_old();
    }

    /// Number of sessions held in memory (a sealed token whose session was dropped for idleness
    /// is not counted until it is used again).
    pub fn session_count(&self) -> usize {
        self.by_token.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// Whether etcd refused a request because of its token, which a renewal fixes: an expired or
/// unknown token, or one issued before the auth store changed.
pub fn is_token_rejection(code: Code, message: &str) -> bool {
    matches!(
        (code, message),
        (Code::Unauthenticated, etcd_errors::INVALID_AUTH_TOKEN)
            | (Code::InvalidArgument, etcd_errors::AUTH_REVISION_OLD)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(user: &str) -> Credentials {
        Credentials { user: user.to_owned(), password: Secret::new(b"pw".to_vec()) }
    }

    #[tokio::test]
    async fn concurrent_rejections_renew_once() {
        let session = Arc::new(Session::new(credentials("u"), Some("simple.1".to_owned()), true));
        let calls = Arc::new(AtomicU64::new(0));
        let first = session.token(None, |_| async { Authenticated::Token("unused".into()) }).await.unwrap();
        assert_eq!(first.generation(), 0);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (session, calls) = (Arc::clone(&session), Arc::clone(&calls));
            tasks.push(tokio::spawn(async move {
                session
                    .token(Some(0), |_| async move {
                        calls.fetch_add(1, Relaxed);
                        tokio::task::yield_now().await;
                        Authenticated::Token("simple.2".into())
                    })
                    .await
                    .unwrap()
                    .generation()
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), 1);
        }
        assert_eq!(calls.load(Relaxed), 1);
    }

    #[test]
    fn tokens_and_identities() {
        let sessions = AuthSessions::new(AuthConfig {
            default_identity: Some(credentials("default")),
            cn_identities: vec![("client-a".to_owned(), credentials("a"))],
            session_idle_timeout: Duration::from_secs(60),
            max_login_delay: Duration::from_secs(5),
            session_keys: None,
        })
        .unwrap();
        let token = sessions.open(credentials("alice"), "simple.1".to_owned()).unwrap();
        assert!(token.starts_with("ecp."), "{token}");
        let mut headers = HeaderMap::new();
        headers.insert(TOKEN_HEADER, token.parse().unwrap());
        assert!(matches!(sessions.identify(&headers, None), Identity::Session(s) if s.user() == "alice"));
        headers.insert(TOKEN_HEADER, "etcd-token.5".parse().unwrap());
        assert!(matches!(sessions.identify(&headers, None), Identity::UnknownToken));
        let mut authorization = HeaderMap::new();
        authorization.insert(AUTHORIZATION_HEADER, token.parse().unwrap());
        assert!(matches!(sessions.identify(&authorization, None), Identity::Session(s) if s.user() == "alice"));
        authorization.insert(AUTHORIZATION_HEADER, "etcd-token.5".parse().unwrap());
        assert!(matches!(sessions.identify(&authorization, None), Identity::UnknownToken));
        let mtls = ClientInfo { common_name: Some("client-a".into()), ..ClientInfo::default() };
        assert!(matches!(sessions.identify(&HeaderMap::new(), Some(&mtls)), Identity::Session(s) if s.user() == "a"));
        assert!(matches!(sessions.identify(&HeaderMap::new(), None), Identity::Session(s) if s.user() == "default"));
        assert!(!format!("{:?}", credentials("x")).contains("pw"));
    }

    #[test]
    fn idle_sessions_are_forgotten() {
        let sessions =
            AuthSessions::new(AuthConfig { session_idle_timeout: Duration::ZERO, ..AuthConfig::default() }).unwrap();
        let token = sessions.open(credentials("alice"), "simple.1".to_owned()).unwrap();
        assert_eq!(sessions.session_count(), 1);
        sessions.expire_idle();
        assert_eq!(sessions.session_count(), 0);
        // The token itself still stands for the session: it is opened again, without etcd's token.
        let mut headers = HeaderMap::new();
        headers.insert(TOKEN_HEADER, token.parse().unwrap());
        assert!(matches!(sessions.identify(&headers, None), Identity::Session(s) if s.user() == "alice"));
        assert_eq!(sessions.session_count(), 1);
    }

    #[test]
    fn a_shared_key_lets_another_process_open_the_session_until_revoked() {
        let key = || Some((std::path::PathBuf::from("keys"), vec![Secret::new(vec![9; 32])]));
        let first = AuthSessions::new(AuthConfig { session_keys: key(), ..AuthConfig::default() }).unwrap();
        let second = AuthSessions::new(AuthConfig { session_keys: key(), ..AuthConfig::default() }).unwrap();
        let stranger = AuthSessions::new(AuthConfig::default()).unwrap();
        let token = first.open(credentials("alice"), "simple.1".to_owned()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(TOKEN_HEADER, token.parse().unwrap());
        let Identity::Session(session) = second.identify(&headers, None) else { panic!("not opened") };
        assert_eq!((session.user(), session.credentials.password.expose()), ("alice", &b"pw"[..]));
        assert!(session.issued_to_client());
        assert!(matches!(stranger.identify(&headers, None), Identity::UnknownToken));
        // etcd refused the password: the token is refused from then on.
        session.revoke();
        assert!(matches!(second.identify(&headers, None), Identity::UnknownToken));
        // The key removed (rotated out): refused everywhere the file changed.
        assert!(first.replace_keys(&[Secret::new(vec![8; 32])]));
        assert!(matches!(first.identify(&headers, None), Identity::UnknownToken));
    }

    #[test]
    fn jwt_expiry_is_read() {
        use base64::Engine;
        let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 100;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"exp\":{exp},\"revision\":5,\"username\":\"root\"}}"));
        let renew = jwt_renewal_time(&format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig")).unwrap();
        let secs = renew.duration_since(Instant::now()).as_secs();
        assert!((70..=75).contains(&secs), "{secs}");
        assert!(jwt_renewal_time("KzXsZsYqAbCdEfGh.42").is_none());
    }
}
