//! Serializable Ranges answered from the cache (see `cache` for why an answer is fresh), etcd's
//! answers stored in it, and writes through the proxy clearing what they change before their
//! answer reaches the client.

use std::sync::Arc;

use bytes::Bytes;

use crate::cache::{self, Cacheable, ReadCache};
use crate::grpc::{Code, Writes};

use super::cache_watch;
use super::relay::Buffered;
use super::{Admitted, Forwarder, UnaryAnswer};

/// Bookkeeping of a stored answer beyond its message: its headers and trailers.
const HEADERS_COST: usize = 256;

impl Forwarder {
    /// The range of a Range call the cache may answer, when the cache is on.
    pub(super) fn cacheable(&self, call: &Admitted) -> Option<Cacheable> {
        let cache = self.read_cache.as_ref()?;
        let message = call.body.message()?;
        // Compressed requests (flag 1) are left alone.
        let range = (message.first() == Some(&0)).then(|| cache::cacheable_range(&message[5..]))??;
        Some(Cacheable { range, epoch: cache.epoch() })
    }

    /// The cached answer to `call`, if it is fresh and within the client's `budget`.
    pub(super) fn cached_answer(&self, call: &Admitted, budget: Option<usize>) -> Option<Buffered> {
        let (cache, message) = (self.read_cache.as_ref()?, call.body.message()?);
        let answer = cache.get(call.session.as_deref().map(|s| s.user()), message)?;
        // One too large for the client is left to the forwarding path, which explains the refusal.
        budget.is_none_or(|budget| answer.fits(budget)).then_some(answer)
    }

    /// What etcd's answer to `call` changes in the cache: a cacheable Range's answer is stored,
    /// and a write clears what it touched before the client hears it succeeded.
    pub(super) fn update_cache(&self, call: &Admitted, cacheable: Option<Cacheable>, answer: &UnaryAnswer) {
        match (cacheable, answer) {
            (Some(range), UnaryAnswer::Whole(whole)) => self.remember(call, range, whole),
            (Some(_), UnaryAnswer::Large { .. }) => {}
            (None, answer) => self.written(call, answer),
        }
    }

    /// Stores etcd's successful answer to `call` over `range`, and starts the user's watch
    /// stream when it is the user's first cached range.
    pub(super) fn remember(&self, call: &Admitted, cacheable: Cacheable, answer: &Buffered) {
        let (Some(cache), Some(request)) = (self.read_cache.as_ref(), call.body.message()) else { return };
        if answer.code() != Some(Code::Ok) {
            return;
        }
        // A copy of its own, in one piece: the answer's bytes may share a connection buffer
        // many times larger, or come in several chunks (a limited client's answer).
        let stored = answer.detached();
        let Some(message) = stored.message_bytes() else { return };
        let Some(revision) = cache::header_revision(message) else { return };
        let user = call.session.as_deref().map(|s| Arc::from(s.user()));
        let cost = message.len() + HEADERS_COST;
        let request = Bytes::copy_from_slice(request);
        if let Some(watcher) = cache.insert(user, request, cacheable, revision, stored, cost) {
            let keep_fresh =
                cache_watch::keep_fresh(Arc::clone(&self.sender), call.session.clone(), Arc::clone(cache), watcher);
            tokio::spawn(keep_fresh);
        }
    }

    /// A write's answer: the cached answers it made stale are dropped before the client sees it.
    pub(super) fn written(&self, call: &Admitted, answer: &UnaryAnswer) {
        let Some(cache) = self.read_cache.as_ref() else { return };
        if call.route.writes == Writes::Nothing {
            return;
        }
        // etcd writes the header first, so a relayed answer's first chunk holds its revision
        // unless etcd sent a first frame too small for it; then nothing cached is proven fresh.
        let revision = match answer {
            // etcd's failures carry no message (trailers only): only successes are read.
            UnaryAnswer::Whole(whole) => match whole.message_bytes() {
                Some(message) => cache::header_revision(message),
                None => return,
            },
            UnaryAnswer::Large { first, .. } => first.get(5..).and_then(cache::header_revision),
        };
        let Some(revision) = revision else {
            cache.forget_everything();
            return;
        };
        cache.written(revision, || {
            let request = call.body.message().filter(|m| m.first() == Some(&0));
            request
                .and_then(|request| cache::written_ranges(call.route.writes, &request[5..]))
                .unwrap_or(cache::Written::Everything)
        });
    }
}

/// The cache the request path uses, when `bytes` is not 0.
pub(super) fn read_cache(bytes: usize) -> Option<Arc<ReadCache<Buffered>>> {
    (bytes > 0).then(|| Arc::new(ReadCache::new(bytes)))
}
