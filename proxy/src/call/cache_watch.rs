//! The watch stream that keeps one etcd user's cached answers fresh (see `cache`): one upstream
//! Watch stream per user, as that user, with a watch per cached key range, created and cancelled
//! as the cache asks. Events drop the answers they make stale; when the stream ends for any
//! reason (member lost, token refused, cluster switched) every answer of the user goes, and the
//! next answer stored starts a new stream.

use std::sync::Arc;

use bytes::Bytes;
use etcd_compat_proto::etcdserverpb::{watch_request, WatchCreateRequest};
use http_body_util::BodyExt;

use crate::auth::Session;
use crate::cache::{NewWatcher, ReadCache, WatchCommand};
use crate::etcd_errors;
use crate::grpc::{self, Code, MessageReader};
use crate::transport;

use super::attempts::Sender;
use super::relay::Buffered;
use super::watch::{self, read_facts};

/// Runs `watcher`'s stream until the cache closes its channel (no range left to watch) or the
/// stream ends; then the user's answers are forgotten.
pub(super) async fn keep_fresh(
    sender: Arc<Sender>,
    session: Option<Arc<Session>>,
    cache: Arc<ReadCache<Buffered>>,
    watcher: NewWatcher,
) {
    let NewWatcher { user, generation, mut commands } = watcher;
    let why = run(&sender, session.as_deref(), &cache, &mut commands).await;
    tracing::debug!(
        user = user.as_deref().unwrap_or(""),
        why,
        "cache watch stream ended; its user's cached answers are dropped"
    );
    cache.forget_user(&user, generation);
}

/// Drives the stream; returns why it ended.
async fn run(
    sender: &Sender,
    session: Option<&Session>,
    cache: &ReadCache<Buffered>,
    commands: &mut tokio::sync::mpsc::UnboundedReceiver<WatchCommand>,
) -> &'static str {
    let (to_upstream, receiver) = transport::feed();
    let headers = grpc::own_call_headers();
    let mut opening = std::pin::pin!(sender.open_watch_stream(session, headers, receiver, None));
    // Creates asked for while etcd answers wait in the feed.
    let opened = loop {
        tokio::select! {
            opened = &mut opening => break opened,
            command = commands.recv() => match command {
                Some(command) => to_upstream.send(encode(command)),
                None => return "no range left to watch",
            },
        }
    };
    let Ok(opened) = opened else { return "no member took the stream" };
    let (parts, mut body) = opened.response.into_parts();
    tracing::debug!(member = %opened.member, "cache watch stream open");
    if Code::from_headers(&parts.headers).is_some_and(|code| code != Code::Ok) {
        return "etcd refused the stream";
    }
    let mut messages = MessageReader::default();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => to_upstream.send(encode(command)),
                // Dropping the stream cancels its watches at etcd.
                None => return "no range left to watch",
            },
            frame = body.frame() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(error)) => {
                        tracing::debug!(member = %opened.member, %error, "cache watch stream broke");
                        return "the stream broke";
                    }
                    None => return "the stream ended",
                };
                let Ok(data) = frame.into_data() else { return "etcd ended the stream" };
                messages.push(&data);
                while let Some(message) = messages.next_message() {
                    if let Err(why) = on_message(cache, &message) {
                        return why;
                    }
                }
            }
        }
    }
}

/// Applies one WatchResponse to the cache; an error ends the stream.
fn on_message(cache: &ReadCache<Buffered>, message: &Bytes) -> Result<(), &'static str> {
    let Some(Ok(facts)) = (message.first() == Some(&0)).then(|| read_facts(&message[5..])) else {
        return Err("etcd sent a message the proxy cannot read");
    };
    if facts.canceled {
        tracing::debug!(watch = facts.watch_id, reason = facts.cancel_reason, "etcd cancelled a cache watch");
        let token_refused =
            etcd_errors::WATCH_TOKEN_CANCEL_REASONS.iter().any(|reason| facts.cancel_reason.ends_with(reason));
        if token_refused {
            // Every later create on this stream would be refused too: a new stream renews it.
            return Err("etcd refused the stream's token");
        }
        cache.watch_ended(facts.watch_id);
    } else if facts.events > 0 {
        cache.changed(facts.watch_id, facts.last_event_revision);
    }
    Ok(())
}

fn encode(command: WatchCommand) -> Bytes {
    match command {
        WatchCommand::Create { id, range, start_revision } => {
            watch::frame_request(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                key: range.key,
                range_end: range.range_end,
                start_revision,
                watch_id: id,
                ..Default::default()
            }))
        }
        WatchCommand::Cancel { id } => watch::frame_cancel(id),
    }
}
