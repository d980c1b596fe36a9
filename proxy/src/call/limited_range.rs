//! A Range from a client with a message size limit: served from pages under the budget (see
//! `budget`), each page sent as the client's etcd user.

use bytes::Bytes;
use http::HeaderMap;
use prost::Message;

use etcd_compat_proto::etcdserverpb::RangeRequest;

use crate::auth::Session;
use crate::budget;
use crate::error::ProxyFailure;
use crate::grpc::{self, Code};

use super::attempts::PendingBody;
use super::relay::Buffered;
use super::{Forwarder, UnaryAnswer};

impl Forwarder {
    /// A Range from a client with a size budget, and whether it is the whole result (etcd's
    /// answer, or pages of one revision put together; not paged, cut or refused); `None` when it
    /// is simply forwarded.
    pub(super) async fn limited_range(
        &self,
        headers: &HeaderMap,
        path_and_query: &http::uri::PathAndQuery,
        message: &Bytes,
        budget: usize,
        rule: budget::LimitRule<'_>,
        session: Option<&Session>,
    ) -> Option<(Buffered, bool)> {
        // Compressed (flag 1) or malformed frames are left for etcd to judge.
        let request = grpc::decode_framed::<RangeRequest>(message)?;
        if !budget::pageable(&request) {
            return None;
        }
        let route = grpc::route(path_and_query.path());
        let key = request.key.clone();
        let fetch = |page: RangeRequest| {
            let mut body = PendingBody::Buffered(grpc::frame(&page.encode_to_vec()));
            let mut headers = headers.clone();
            async move {
                // Each page is a read of its own: sent once more if its answer breaks off.
                let answer = self
                    .read_answer(session, &route, path_and_query, &mut headers, &mut body, true)
                    .await
                    .map_err(|error| Buffered::status(error.into_status()))?;
                let buffered = match answer {
                    UnaryAnswer::Whole(whole) => whole,
                    UnaryAnswer::Large { response, first, .. } => Buffered::collect(response, Some(first))
                        .await
                        .map_err(|broken| Buffered::broken(&broken, &route))?,
                };
                if buffered.code() != Some(Code::Ok) {
                    return Err(buffered);
                }
                let raw = buffered
                    .message()
                    .ok_or_else(|| Buffered::status(ProxyFailure::RangePageWithoutMessage.status()))?;
                budget::Page::parse(raw).map_err(|e| Buffered::status(ProxyFailure::RangePageUndecodable(e).status()))
            }
        };
        let answer = budget::serve_range(&self.budget, budget, &self.key_sizes, request, fetch).await;
        let (outcome, response) = match answer {
            budget::Answer::Raw(raw) => {
                (budget::Outcome::Whole, Buffered::message_ok(vec![grpc::frame_prefix(raw.len()), raw]))
            }
            budget::Answer::Assembled(framed, outcome) => (outcome, Buffered::message_ok(framed)),
            budget::Answer::Refused(why) => (budget::Outcome::Refused, Buffered::status(why.status())),
            budget::Answer::Upstream(failed) => return Some((failed, false)),
        };
        self.sender.metrics.budget_applied(outcome, self.budget.truncate_prefix_label(&key));
        if outcome != budget::Outcome::Whole && self.limited_log.should_log(&key) {
            tracing::info!(
                key = %budget::printable(&key),
                %rule,
                budget,
                outcome = outcome.label(),
                "Range answer limited for a client with a message size limit"
            );
        } else {
            tracing::debug!(key = %budget::printable(&key), %rule, budget, outcome = outcome.label(), "limited Range");
        }
        Some((response, outcome == budget::Outcome::Whole))
    }
}
