//! Sending as a client's etcd user: the proxy's session for the caller supplies etcd's token,
//! renewed before it expires and whenever etcd refuses it, and a refused request is sent once
//! more; and a client's own Authenticate, answered with a token of the proxy's.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use prost::Message;

use etcd_compat_proto::etcdserverpb::{AuthenticateRequest, AuthenticateResponse};

use crate::auth::{self, Authenticated, Credentials, Secret, Session, UpstreamToken};
use crate::error::{CallError, ProxyFailure};
use crate::etcd_errors;
use crate::grpc::{self, CallShape, Code, Route};
use crate::transport::FeedReceiver;
use crate::upstream::Member;

use super::attempts::{PendingBody, Sender, Upstreamed};
use super::relay::Buffered;
use super::watch::OpenedStream;

/// Further attempts of an Authenticate the proxy makes for a session, when etcd is unavailable.
const AUTHENTICATE_RETRIES: usize = 3;
/// Pause before each of them: about one election.
const AUTHENTICATE_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);

impl Sender {
    /// Opens an upstream Watch stream as `session`'s user (renewing its token first if `rejected`
    /// names the current one), with request messages from `receiver`.
    pub(crate) async fn open_watch_stream(
        &self,
        session: Option<&Session>,
        mut headers: HeaderMap,
        receiver: FeedReceiver,
        rejected: Option<u64>,
    ) -> Result<OpenedStream, (Code, String)> {
        let token_generation = match session {
            Some(session) => {
                // Boxed: a fleet opens thousands of these at once, most without a session.
                let token = Box::pin(self.session_token(session, rejected)).await?;
                Session::authorize(&token, &mut headers);
                Some(token.generation())
            }
            None => None,
        };
        let path = http::uri::PathAndQuery::from_static(grpc::WATCH_PATH);
        let route = grpc::route(grpc::WATCH_PATH);
        let mut body = PendingBody::Channel(Some(receiver));
        let (response, member) = self.send(&route, &path, &headers, &mut body).await.map_err(CallError::into_status)?;
        Ok(OpenedStream { response, member: member.name(), token_generation })
    }

    /// Sends a request as `session`'s etcd user (or as it came, without one); when etcd refuses
    /// the token, renews it once for all concurrent callers and sends a replayable request again.
    pub(crate) async fn send_as(
        &self,
        session: Option<&Session>,
        route: &Route,
        path_and_query: &http::uri::PathAndQuery,
        headers: &mut HeaderMap,
        body: &mut PendingBody,
    ) -> Result<(Upstreamed, Arc<Member>), CallError> {
        let Some(session) = session else {
            let (response, member) = self.send(route, path_and_query, headers, body).await?;
            return Ok((Upstreamed::Streaming { response, first: None }, member));
        };
        // Boxed: renewals and retries are rare (see `call`).
        Box::pin(self.send_with_session(session, route, path_and_query, headers, body)).await
    }

    async fn send_with_session(
        &self,
        session: &Session,
        route: &Route,
        path_and_query: &http::uri::PathAndQuery,
        headers: &mut HeaderMap,
        body: &mut PendingBody,
    ) -> Result<(Upstreamed, Arc<Member>), CallError> {
        let mut rejected = None;
        loop {
            let token = self.session_token(session, rejected).await?;
            Session::authorize(&token, headers);
            let (response, member) = self.send(route, path_and_query, headers, body).await?;
            let retryable = rejected.is_none() && matches!(body, PendingBody::Buffered(_));
            let answer = match Code::from_headers(response.headers()) {
                Some(_) => Buffered::collect(response, None).await.map_or_else(Upstreamed::Broke, Upstreamed::Ended),
                // etcd behind TLS sends a unary error as headers, then trailers: look at the first frame.
                None if retryable && route.shape == CallShape::Unary => Upstreamed::peek(response).await,
                None => Upstreamed::Streaming { response, first: None },
            };
            let refused_token = match &answer {
                Upstreamed::Ended(ended) => {
                    ended.code().is_some_and(|code| auth::is_token_rejection(code, &ended.status_message()))
                }
                Upstreamed::Streaming { .. } | Upstreamed::Broke(_) => false,
            };
            if !refused_token || !retryable {
                return Ok((answer, member));
            }
            self.metrics.auth_retried();
            rejected = Some(token.generation());
        }
    }

    /// The session's current etcd token, renewed first if due or if `rejected` names it.
    pub(crate) async fn session_token(
        &self,
        session: &Session,
        rejected: Option<u64>,
    ) -> Result<UpstreamToken, (Code, String)> {
        let renewed = session.token(rejected, |credentials| self.authenticate_upstream(credentials)).await;
        renewed.map_err(|(code, message)| {
            tracing::warn!(user = session.user(), code = code.name(), %message, "etcd refused to renew a session's token");
            // Only a refusal of the credentials themselves is worth a new login; a cluster that is
            // briefly unavailable is reported as such, and the client retries.
            let credentials_refused = matches!(code, Code::InvalidArgument | Code::PermissionDenied | Code::NotFound);
            if session.issued_to_client() && credentials_refused {
                // The password changed (or the user went): the token is dead in this process, so
                // that its next uses do not each cost etcd a refused login.
                session.revoke();
                // The client authenticates again and then sees etcd's own answer to its credentials.
                ProxyFailure::InvalidToken.status()
            } else {
                (code, message)
            }
        })
    }

    /// Asks etcd for a token for `credentials` (sessions renewing theirs).
    async fn authenticate_upstream(&self, credentials: Credentials) -> Authenticated {
        self.metrics.auth_renewed();
        let mut request = AuthenticateRequest {
            name: credentials.user.clone(),
            password: String::from_utf8_lossy(credentials.password.expose()).into_owned(),
        };
        let mut encoded = request.encode_to_vec();
        zeroize::Zeroize::zeroize(&mut request.password);
        let framed = grpc::frame(&encoded);
        zeroize::Zeroize::zeroize(&mut encoded);
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        let path = http::uri::PathAndQuery::from_static(grpc::AUTHENTICATE_PATH);
        // Authenticating again is harmless (at worst etcd issues two tokens), so a cluster busy
        // electing a leader is given a few tries.
        let mut answer = self.call(&path, &headers, framed.clone()).await;
        for _ in 0..AUTHENTICATE_RETRIES {
            if answer.code() != Some(Code::Unavailable) {
                break;
            }
            tokio::time::sleep(AUTHENTICATE_RETRY_PAUSE).await;
            answer = self.call(&path, &headers, framed.clone()).await;
        }
        match answer.code() {
            Some(Code::Ok) => match answer.message().and_then(|m| AuthenticateResponse::decode(m).ok()) {
                Some(response) => Authenticated::Token(response.token),
                None => {
                    let (code, message) = ProxyFailure::AuthenticateAnswerUndecodable.status();
                    Authenticated::Refused(code, message)
                }
            },
            code => Authenticated::Refused(code.unwrap_or(Code::Unknown), answer.status_message()),
        }
    }

    /// A client's Authenticate: checked with etcd, answered with a proxy token standing for a new
    /// session; etcd's refusals pass through unchanged, and repeated failures are slowed down.
    pub(crate) async fn authenticate(
        &self,
        headers: &HeaderMap,
        path_and_query: &http::uri::PathAndQuery,
        message: &Bytes,
        client: Option<std::net::IpAddr>,
    ) -> Buffered {
        let Some(mut request) = grpc::decode_framed::<AuthenticateRequest>(message) else {
            return Buffered::status(ProxyFailure::AuthenticateUndecodable.status());
        };
        let turn = self.auth.admit_login(client).await;
        let answer = self.call(path_and_query, headers, message.clone()).await;
        let password = Secret::new(std::mem::take(&mut request.password).into_bytes());
        let credentials = Credentials { user: std::mem::take(&mut request.name), password };
        // etcd answers wrong credentials with InvalidArgument; anything else says nothing about them.
        turn.finish(match answer.code() {
            Some(Code::Ok) => Some(true),
            Some(Code::InvalidArgument) => Some(false),
            _ => None,
        });
        if answer.code() == Some(Code::InvalidArgument) && answer.status_message() == etcd_errors::AUTH_FAILED {
            self.metrics.explainer.login_refused(&credentials.user);
        }
        if answer.code() != Some(Code::Ok) {
            return answer;
        }
        let Some(mut response) = answer.message().and_then(|m| AuthenticateResponse::decode(m).ok()) else {
            return Buffered::status(ProxyFailure::AuthenticateAnswerUndecodable.status());
        };
        let user = credentials.user.clone();
        match self.auth.open(credentials, std::mem::take(&mut response.token)) {
            Ok(proxy_token) => {
                tracing::debug!(%user, "client authenticated; session opened");
                response.token = proxy_token;
                Buffered::message_ok(vec![grpc::frame_message(&response)])
            }
            Err(status) => Buffered::status(status),
        }
    }
}
