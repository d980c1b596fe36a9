//! What a client's request must be before anything of it goes to etcd: a gRPC request (method,
//! content-type, `grpc-timeout`), with messages no larger than etcd accepts, that keep arriving.
//!
//! Each refusal is the one etcd would give, so that a client sees the same thing through the
//! proxy as directly: etcd resets a stream that is not a gRPC request with PROTOCOL_ERROR, answers
//! an oversize message with its gRPC server's `ResourceExhausted`, and a passed deadline with
//! `DeadlineExceeded`. A message that stops arriving has no etcd equivalent (etcd waits as long
//! as the client's deadline allows); the proxy ends it after `--request-body-timeout`, so that a
//! stalled client holds no call open.
//!
//! What request messages make the proxy hold is bounded for all calls together
//! ([`MemoryBudget`], `--max-held-request-bytes`): many streams on many connections, each with
//! a message under etcd's limit, could otherwise add up to any amount of memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::admin::Refusal;
use crate::error::ProxyFailure;
use crate::grpc;

/// The header carrying a call's deadline.
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Why a request is not a gRPC request; the proxy resets its stream, as etcd does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotGrpc(pub &'static str);

/// Checks what etcd's gRPC server checks before it reads a request, and returns the request's
/// deadline (from `grpc-timeout`), if it has one.
pub fn check_headers(method: &http::Method, headers: &HeaderMap) -> Result<Option<Instant>, NotGrpc> {
    if method != http::Method::POST {
        return Err(NotGrpc("the method is not POST"));
    }
    match headers.get(http::header::CONTENT_TYPE) {
        Some(value) if grpc::is_grpc_content_type(value.as_bytes()) => {}
        _ => return Err(NotGrpc("the content-type is not application/grpc")),
    }
    match headers.get(&GRPC_TIMEOUT) {
        None => Ok(None),
        Some(value) => match grpc::parse_grpc_timeout(value.as_bytes()) {
            Some(timeout) => Ok(Some(Instant::now() + timeout)),
            None => Err(NotGrpc("the grpc-timeout header is malformed")),
        },
    }
}

/// A client request refused by the proxy with a status.
#[derive(Debug)]
pub struct Refused {
    /// For metrics.
    pub why: Refusal,
    /// What the client is told.
    pub failure: ProxyFailure,
}

impl Refused {
    /// The call's deadline passed, answered as etcd answers it.
    pub fn deadline() -> Refused {
        Refused { why: Refusal::Deadline, failure: ProxyFailure::DeadlineExceeded }
    }

    /// A message larger than etcd accepts, answered as etcd answers it.
    pub fn too_large(claimed: u64, limit: usize) -> Refused {
        Refused { why: Refusal::TooLarge, failure: ProxyFailure::MessageTooLarge { claimed, limit } }
    }

    /// A client message that stopped arriving.
    pub fn stalled(after: Duration) -> Refused {
        Refused { why: Refusal::Stalled, failure: ProxyFailure::MessageStalled(after) }
    }

    /// A request that found no room in [`MemoryBudget`] for `waited`.
    pub fn memory_full(limit: usize, waited: Duration) -> Refused {
        Refused { why: Refusal::MemoryFull, failure: ProxyFailure::RequestMemoryFull { limit, waited } }
    }

    /// A read's answer of `length` bytes that found no room among the answers held for clients.
    pub fn response_memory_full(limit: usize, length: usize) -> Refused {
        Refused { why: Refusal::ResponseMemoryFull, failure: ProxyFailure::ResponseMemoryFull { limit, length } }
    }

    /// A stream's next message that found no room in [`MemoryBudget`]; streams do not wait.
    pub fn stream_memory_full(limit: usize) -> Refused {
        Refused { why: Refusal::MemoryFull, failure: ProxyFailure::StreamMemoryFull { limit } }
    }
}

/// Memory shared by every call for what clients make the proxy hold: their request messages
/// (`--max-held-request-bytes`), or answers they have not taken yet (`--max-held-response-bytes`:
/// see `relay::HeldAnswer`, and `client_queue` for streams). Bytes are counted while held; a
/// request that finds no room waits for it, with nothing read meanwhile.
pub struct MemoryBudget {
    room: Arc<Semaphore>,
    limit: usize,
    /// Names its gauges.
    kind: MemoryKind,
    /// Bytes counted without room (see [`MemoryBudget::counted`]): they may pass the limit.
    already_read: AtomicUsize,
}

/// What a [`MemoryBudget`] holds.
#[derive(Clone, Copy)]
pub enum MemoryKind {
    /// Client request messages (`--max-held-request-bytes`).
    Requests,
    /// Answers waiting for their clients (`--max-held-response-bytes`).
    Responses,
}

/// Bytes counted in a [`MemoryBudget`] until dropped.
pub type HeldBytes = OwnedSemaphorePermit;

impl MemoryBudget {
    /// Room for `limit` bytes (at most [`Semaphore::MAX_PERMITS`]).
    pub fn new(limit: usize, kind: MemoryKind) -> Arc<MemoryBudget> {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        Arc::new(MemoryBudget { room: Arc::new(Semaphore::new(limit)), limit, kind, already_read: AtomicUsize::new(0) })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.limit - self.room.available_permits() + self.already_read.load(Relaxed)
    }

    /// Whether it holds its limit or more: streams stop taking etcd's data for clients that
    /// are behind (see `client_queue`).
    pub fn is_full(&self) -> bool {
        self.held() >= self.limit
    }

    /// `bytes` (a stream's message, already read from etcd: it can neither wait nor be refused)
    /// counted until the last copy of them is dropped, wherever it is by then: the client's
    /// queue, a shared watch's subscribers, the connection's send buffer.
    pub fn counted(self: &Arc<Self>, bytes: Bytes) -> Bytes {
        if bytes.is_empty() {
            return bytes;
        }
        self.already_read.fetch_add(bytes.len(), Relaxed);
        Bytes::from_owner(CountedBytes { bytes, budget: Arc::clone(self) })
    }

    /// The most it holds.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts `bytes` if there is room now.
    pub fn try_hold(&self, bytes: usize) -> Option<HeldBytes> {
        if self.already_read.load(Relaxed).saturating_add(bytes) > self.room.available_permits() {
            return None;
        }
        Arc::clone(&self.room).try_acquire_many_owned(permits(bytes)).ok()
    }

    /// Counts `bytes` once there is room; first come, first served, so a large request is not
    /// passed over for ever by small ones.
    async fn hold(&self, bytes: usize) -> HeldBytes {
        match Arc::clone(&self.room).acquire_many_owned(permits(bytes)).await {
            Ok(held) => held,
            // The semaphore is never closed, so this never runs.
            Err(_) => std::future::pending().await,
        }
    }

    /// `held` (if any) and `bytes` more, counted once there is room (see
    /// [`MemoryBudget::wait_for_room`]).
    async fn grow(
        &self,
        held: Option<HeldBytes>,
        bytes: usize,
        limits: MessageLimits,
        deadline: Option<Instant>,
    ) -> Result<HeldBytes, Refused> {
        let more = match self.try_hold(bytes) {
            Some(more) => more,
            // Boxed: a rare path, kept out of every call's future.
            None => Box::pin(self.wait_for_room(bytes, limits, deadline)).await?,
        };
        Ok(match held {
            Some(mut held) => {
                held.merge(more);
                held
            }
            None => more,
        })
    }

    /// Counts `bytes` once there is room, waiting for it until the request's stall timeout or
    /// deadline: the client is not to blame for that wait, so the refusal says why it came.
    async fn wait_for_room(
        &self,
        bytes: usize,
        limits: MessageLimits,
        deadline: Option<Instant>,
    ) -> Result<HeldBytes, Refused> {
        let (at, is_stall) = stall_or_deadline_at(limits.stall_timeout, deadline);
        match tokio::time::timeout_at(at, self.hold(bytes)).await {
            Ok(more) => Ok(more),
            Err(_) if is_stall => Err(Refused::memory_full(self.limit, limits.stall_timeout)),
            Err(_) => Err(Refused::deadline()),
        }
    }
}

/// The owner of a [`MemoryBudget::counted`] message: gives its count back when dropped.
struct CountedBytes {
    bytes: Bytes,
    budget: Arc<MemoryBudget>,
}

impl AsRef<[u8]> for CountedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for CountedBytes {
    fn drop(&mut self) {
        self.budget.already_read.fetch_sub(self.bytes.len(), Relaxed);
    }
}

impl crate::admin::RenderMetrics for MemoryBudget {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let (name, held, flag) = match self.kind {
            MemoryKind::Requests => (
                "request",
                "Bytes of client request messages the proxy holds now (being read, or kept for a retry until the call ends).",
                "client request messages (--max-held-request-bytes)",
            ),
            MemoryKind::Responses => (
                "response",
                "Bytes the proxy holds now for clients that have not taken them: answers over 64 KiB read whole, and etcd's messages waiting on Watch and keep-alive streams.",
                "answers for clients (--max-held-response-bytes)",
            ),
        };
        let _ = writeln!(out, "# HELP etcd_compat_proxy_held_{name}_bytes {held}");
        let _ = writeln!(out, "# TYPE etcd_compat_proxy_held_{name}_bytes gauge");
        let _ = writeln!(out, "etcd_compat_proxy_held_{name}_bytes {}", self.held());
        let _ = writeln!(
            out,
            "# HELP etcd_compat_proxy_held_{name}_bytes_limit The most the proxy holds of {flag} at once."
        );
        let _ = writeln!(out, "# TYPE etcd_compat_proxy_held_{name}_bytes_limit gauge");
        let _ = writeln!(out, "etcd_compat_proxy_held_{name}_bytes_limit {}", self.limit);
    }
}

/// Semaphore permits for `bytes`: one per byte (a DATA frame is at most 16 MiB, far below u32).
fn permits(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Limits on reading one request's messages.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    /// Largest message, prefix excluded.
    pub max_message: usize,
    /// Longest pause inside an incomplete message.
    pub stall_timeout: Duration,
}

/// Limits of a stream the proxy relays message by message (Watch, keep-alives).
#[derive(Clone)]
pub struct StreamLimits {
    /// How the client's messages are read.
    pub messages: MessageLimits,
    /// etcd data held for the client before the stream stops taking more.
    pub max_buffered: usize,
    /// Where what the client's messages hold is counted.
    pub memory: Arc<MemoryBudget>,
    /// Where what waits for the client is counted, and who is told when it stops reading.
    pub queue: super::client_queue::Watched,
}

/// A stream client's messages as they arrive (Watch, keep-alives): whole ones are taken out,
/// and what stays (the start of the next, or messages waiting their turn) is counted in
/// [`MemoryBudget`]. Most frames carry whole messages, so most streams count nothing.
pub struct ClientMessages {
    reader: grpc::MessageReader,
    /// `None` for the proxy's own requests (a shared watch's stream), which it never holds long.
    memory: Option<Arc<MemoryBudget>>,
    held: Option<HeldBytes>,
}

impl ClientMessages {
    /// Messages of at most `max_message` bytes, what they hold counted in `memory`.
    pub fn new(max_message: usize, memory: Option<Arc<MemoryBudget>>) -> ClientMessages {
        ClientMessages { reader: grpc::MessageReader::with_limit(max_message), memory, held: None }
    }

    /// The reader, to push data into and take messages from.
    pub fn reader(&mut self) -> &mut grpc::MessageReader {
        &mut self.reader
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.reader.is_empty()
    }

    /// Counts what the reader holds now, after messages were taken out. More that finds no
    /// room refuses the stream at once: a stream task cannot stop reading its client without
    /// also holding up what it relays the other way.
    pub fn recount(&mut self) -> Result<(), Refused> {
        let Some(memory) = &self.memory else { return Ok(()) };
        let now = self.reader.len();
        let counted = self.held.as_ref().map_or(0, |held| held.num_permits());
        if now == 0 {
            self.held = None;
        } else if now > counted {
            let more = memory.try_hold(now - counted).ok_or_else(|| Refused::stream_memory_full(memory.limit))?;
            match self.held.as_mut() {
                Some(held) => held.merge(more),
                None => self.held = Some(more),
            }
        } else if let Some(held) = self.held.as_mut() {
            drop(held.split(counted - now));
        }
        Ok(())
    }
}

/// The stall timeout of a stream client's incomplete message (Watch, keep-alives). It runs only
/// while the proxy reads that client: while the proxy itself does not (the client is behind on
/// its answers, its requests wait for etcd, the stream moves between members), the rest of the
/// message may be waiting unread, and a client cut off for that would be blamed for the
/// proxy's pause.
pub struct StallTimer {
    timeout: Duration,
    /// Running while an incomplete message is held.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Since when the proxy has not read the client, with the timer running.
    paused_at: Option<Instant>,
}

impl StallTimer {
    /// A timer that ends an incomplete message after `timeout` without growth.
    pub fn new(timeout: Duration) -> StallTimer {
        StallTimer { timeout, sleep: None, paused_at: None }
    }

    /// The timeout, for the refusal.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Starts the timeout anew after the client's data was read: running when what is held
    /// ends in an incomplete message, stopped otherwise.
    pub fn restart(&mut self, incomplete: bool) {
        self.paused_at = None;
        if !incomplete {
            self.sleep = None;
            return;
        }
        let at = Instant::now() + self.timeout;
        match self.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// The proxy stops reading the client: the time until [`StallTimer::resume`] is not counted.
    pub fn pause(&mut self) {
        if self.sleep.is_some() && self.paused_at.is_none() {
            self.paused_at = Some(Instant::now());
        }
    }

    /// The proxy reads the client again: the timeout moves on by the time it was paused.
    pub fn resume(&mut self) {
        if let (Some(paused_at), Some(sleep)) = (self.paused_at.take(), self.sleep.as_mut()) {
            let at = sleep.deadline() + paused_at.elapsed();
            sleep.as_mut().reset(at);
        }
    }

    /// Ready once the incomplete message has not grown for the timeout while the proxy read.
    pub fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.sleep.as_mut() {
            Some(sleep) if self.paused_at.is_none() => sleep.as_mut().poll(cx),
            _ => Poll::Pending,
        }
    }
}

/// Reads a single-message request body to its end, refusing it as soon as its prefix claims
/// more than etcd accepts, when it stalls, or when `deadline` passes. What is returned is the
/// body as the client sent it (normally one framed message), never more than one message over
/// the limit's worth, with its bytes counted in `memory` (see [`MemoryBudget`]).
pub async fn read_unary<B>(
    body: &mut B,
    limits: MessageLimits,
    deadline: Option<Instant>,
    memory: &MemoryBudget,
) -> Result<Result<(Bytes, HeldBytes), Refused>, B::Error>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut held: Option<HeldBytes> = None;
    let mut whole = BytesMut::new();
    // The usual case: the whole message in one chunk, kept without a copy while the end of
    // the stream comes in a frame of its own.
    let mut message: Option<Bytes> = None;
    // Made only when the body is not there at once (as it usually is), and moved on as it grows.
    let mut timer: Option<(Pin<Box<tokio::time::Sleep>>, bool)> = None;
    loop {
        let frame = std::future::poll_fn(|cx| {
            if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                return Poll::Ready(Ok(frame));
            }
            let (sleep, stalled) = timer.get_or_insert_with(|| stall_or_deadline(limits.stall_timeout, deadline));
            match sleep.as_mut().poll(cx) {
                Poll::Ready(()) if *stalled => Poll::Ready(Err(Refused::stalled(limits.stall_timeout))),
                Poll::Ready(()) => Poll::Ready(Err(Refused::deadline())),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        let frame = match frame {
            Ok(Some(frame)) => frame?,
            Ok(None) => {
                let message = message.unwrap_or_else(|| whole.freeze());
                // Nothing more to count: an empty body holds nothing, which always has room.
                return Ok(memory.grow(held, 0, limits, deadline).await.map(|held| (message, held)));
            }
            Err(refused) => return Ok(Err(refused)),
        };
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        if whole.is_empty()
            && message.is_none()
            && grpc::framed_length(&data).is_some_and(|length| length == data.len())
        {
            if let Some(refused) = check_size(&data, limits.max_message) {
                return Ok(Err(refused));
            }
            let counted = match memory.grow(held.take(), data.len(), limits, deadline).await {
                Ok(counted) => counted,
                Err(refused) => return Ok(Err(refused)),
            };
            if body.is_end_stream() {
                return Ok(Ok((data, counted)));
            }
            held = Some(counted);
            message = Some(data);
        } else {
            if let Some(message) = message.take() {
                whole.extend_from_slice(&message);
            }
            whole.extend_from_slice(&data);
            if let Some(refused) = check_size(&whole, limits.max_message) {
                return Ok(Err(refused));
            }
            // More than one message in a unary body: etcd judges that, but no more than a
            // message's worth is held for it. Checked before counting, so that what is counted
            // always fits in the memory (at least one message's worth).
            if whole.len() > limits.max_message + 5 {
                return Ok(Err(Refused::too_large((whole.len() - 5) as u64, limits.max_message)));
            }
            match memory.grow(held.take(), data.len(), limits, deadline).await {
                Ok(counted) => held = Some(counted),
                Err(refused) => return Ok(Err(refused)),
            }
        }
        if let Some((sleep, stalled)) = timer.as_mut() {
            let (at, is_stall) = stall_or_deadline_at(limits.stall_timeout, deadline);
            sleep.as_mut().reset(at);
            *stalled = is_stall;
        }
    }
}

/// Which comes first from now: a stall (true) or the call's deadline (false), and when.
fn stall_or_deadline_at(stall_timeout: Duration, deadline: Option<Instant>) -> (Instant, bool) {
    let stall = Instant::now() + stall_timeout;
    match deadline {
        Some(deadline) if deadline <= stall => (deadline, false),
        _ => (stall, true),
    }
}

fn stall_or_deadline(stall_timeout: Duration, deadline: Option<Instant>) -> (Pin<Box<tokio::time::Sleep>>, bool) {
    let (at, stalled) = stall_or_deadline_at(stall_timeout, deadline);
    (Box::pin(tokio::time::sleep_until(at)), stalled)
}

/// Runs a call's work until its deadline (from `grpc-timeout`), if it has one; see [`within`].
pub struct Deadline<F> {
    work: F,
    deadline: Option<Instant>,
    /// Made the first time the work has to wait, for calls with a deadline only.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// `work`, ended with etcd's `DeadlineExceeded` answer when `deadline` passes first (dropping
/// `work` cancels whatever it waited for upstream). Costs nothing without a deadline, and no
/// timer while the work completes without waiting.
pub fn within<F: Future>(deadline: Option<Instant>, work: F) -> Deadline<F> {
    Deadline { work, deadline, timer: None }
}

impl<F: Future + Unpin> Future for Deadline<F> {
    type Output = Result<F::Output, Refused>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(output) = Pin::new(&mut this.work).poll(cx) {
            return Poll::Ready(Ok(output));
        }
        let Some(deadline) = this.deadline else { return Poll::Pending };
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Refused::deadline())),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The refusal of the message starting `data`, if its prefix claims more than `max`.
fn check_size(data: &[u8], max: usize) -> Option<Refused> {
    let claimed = grpc::framed_length(data)? - 5;
    (claimed > max).then(|| Refused::too_large(claimed as u64, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counted_message_is_counted_once_until_its_last_copy_is_gone_and_leaves_no_room() {
        let memory = MemoryBudget::new(1000, MemoryKind::Responses);
        let message = memory.counted(Bytes::from(vec![7; 600]));
        let copies = [message.clone(), message.slice(10..20)];
        assert_eq!(memory.held(), 600, "a copy or a slice is not counted again");
        assert_eq!(&message[..3], &[7, 7, 7]);
        assert!(memory.try_hold(401).is_none(), "an answer that would pass the limit with it");
        let held = memory.try_hold(400).expect("room for what is left");
        assert!(memory.is_full());
        // Already read: counted past the limit rather than refused.
        let over = memory.counted(Bytes::from(vec![1; 50]));
        assert_eq!(memory.held(), 1050);
        drop((message, over, held));
        assert_eq!(memory.held(), 600, "copies still hold it");
        drop(copies);
        assert_eq!(memory.held(), 0);
        assert!(!memory.is_full());
        assert_eq!(memory.counted(Bytes::new()).len(), 0);
        assert_eq!(memory.held(), 0);
    }

    /// A request body fed by the test.
    struct Fed(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl http_body::Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|chunk| chunk.map(|chunk| Ok(http_body::Frame::data(chunk))))
        }
    }

    const LIMITS: MessageLimits = MessageLimits { max_message: 100, stall_timeout: Duration::from_secs(1) };

    async fn read(chunks: Vec<Vec<u8>>, end: bool, deadline: Option<Instant>) -> Result<Bytes, Refused> {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        for chunk in chunks {
            sender.send(Bytes::from(chunk)).unwrap();
        }
        if end {
            drop(sender);
        } else {
            std::mem::forget(sender);
        }
        read_unary(&mut Fed(receiver), LIMITS, deadline, &MemoryBudget::new(1 << 20, MemoryKind::Requests))
            .await
            .unwrap()
            .map(|(message, _)| message)
    }

    #[tokio::test(start_paused = true)]
    async fn messages_are_read_whole_within_the_limit() {
        let message = grpc::frame(&[7; 100]).to_vec();
        assert_eq!(read(vec![message.clone()], true, None).await.unwrap(), message);
        let (head, tail) = message.split_at(3);
        assert_eq!(read(vec![head.to_vec(), tail.to_vec()], true, None).await.unwrap(), message);
        // The end of the stream in a frame of its own, as most clients send it.
        assert_eq!(read(vec![message.clone(), vec![]], true, None).await.unwrap(), message);
        // Two messages are etcd's to refuse; held while they stay within one message's worth.
        let small = grpc::frame(&[7; 10]).to_vec();
        assert_eq!(read(vec![small.clone(), small.clone()], true, None).await.unwrap(), [&small[..], &small].concat());
        let refused = read(vec![message.clone(), small], true, None).await.unwrap_err();
        assert_eq!(refused.failure.status().1, "grpc: received message larger than max (115 vs. 100)");
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversize_message_is_refused_from_its_prefix_without_the_rest() {
        let refused = read(vec![vec![0, 0xff, 0xff, 0xff, 0xff]], false, None).await.unwrap_err();
        assert_eq!(
            refused.failure.status(),
            (grpc::Code::ResourceExhausted, "grpc: received message larger than max (4294967295 vs. 100)".to_owned())
        );
        let refused = read(vec![vec![0, 0], vec![0, 0, 101]], false, None).await.unwrap_err();
        assert_eq!(refused.failure.status().1, "grpc: received message larger than max (101 vs. 100)");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_message_ends_after_the_stall_timeout_and_a_deadline_when_it_passes() {
        let started = Instant::now();
        let refused = read(vec![vec![0, 0, 0, 0, 10, 1, 2]], false, None).await.unwrap_err();
        assert_eq!((refused.why, refused.failure.status().0), (Refusal::Stalled, grpc::Code::DeadlineExceeded));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        let started = Instant::now();
        let deadline = Some(started + Duration::from_millis(300));
        let refused = read(vec![vec![0, 0, 0, 0, 10, 1, 2]], false, deadline).await.unwrap_err();
        assert_eq!(refused.why, Refusal::Deadline);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn empty_frames_do_not_hold_off_the_stall_timeout() {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        sender.send(Bytes::from_static(&[0, 0, 0, 0, 10, 1, 2])).unwrap();
        // Empty DATA frames every 400 ms carry nothing: the message still stalls after 1 s.
        let _feeder = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                let _ = sender.send(Bytes::new());
            }
            std::future::pending::<()>().await;
        });
        let started = Instant::now();
        let refused = read_unary(&mut Fed(receiver), LIMITS, None, &MemoryBudget::new(1 << 20, MemoryKind::Requests))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.why, Refusal::Stalled);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_counted_until_dropped_and_wait_for_room_in_order() {
        let memory = MemoryBudget::new(250, MemoryKind::Requests);
        let body = |chunks: Vec<Vec<u8>>| {
            let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
            for chunk in chunks {
                sender.send(Bytes::from(chunk)).unwrap();
            }
            (sender, Fed(receiver))
        };
        let message = grpc::frame(&[7; 95]).to_vec();
        // Whole in one chunk; then one in two chunks: each counts its 100 bytes.
        let (done, mut first) = body(vec![message.clone()]);
        drop(done);
        let (_, first_held) = read_unary(&mut first, LIMITS, None, &memory).await.unwrap().unwrap();
        let (done, mut second) = body(vec![message[..50].to_vec(), message[50..].to_vec()]);
        drop(done);
        let (second_message, second_held) = read_unary(&mut second, LIMITS, None, &memory).await.unwrap().unwrap();
        assert_eq!((second_message.to_vec(), memory.held()), (message.clone(), 200));

        // A third gets 50 bytes in, then waits for room for the rest; it is not refused as
        // stalled meanwhile, and goes on once the first call ends.
        let (feed, mut third) = body(vec![message[..50].to_vec(), message[50..].to_vec()]);
        drop(feed);
        let waiting = tokio::spawn(async move {
            let memory = memory;
            let read = read_unary(&mut third, LIMITS, None, &memory).await.unwrap().map(|(m, _)| m.len());
            (read, memory)
        });
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!waiting.is_finished());
        drop(first_held);
        let (read, memory) = waiting.await.unwrap();
        assert_eq!(read.unwrap(), 100);
        drop(second_held);
        assert_eq!(memory.held(), 0);

        // No room within the stall timeout: refused, saying why; what it held is given back.
        let full = memory.try_hold(250).unwrap();
        let (_feed, mut fourth) = body(vec![message.clone()]);
        let started = Instant::now();
        let refused = read_unary(&mut fourth, LIMITS, None, &memory).await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(refused.why, Refusal::MemoryFull);
        assert_eq!(
            refused.failure.status(),
            (
                grpc::Code::Unavailable,
                "etcd-compat-proxy: the request messages the proxy holds reached --max-held-request-bytes (250 bytes) \
                 and this one found no room within 1s; nothing was sent to etcd, so it is safe to retry; if this is no \
                 flood of large requests, raise --max-held-request-bytes"
                    .to_owned()
            )
        );
        drop(full);
        assert_eq!(memory.held(), 0);
        // A body of several messages over one message's worth is refused as too large at once,
        // even when the memory holds no more than one message's worth.
        let tight = MemoryBudget::new(LIMITS.max_message + 5, MemoryKind::Requests);
        let small = grpc::frame(&[7; 10]).to_vec();
        let (done, mut several) = body(vec![small.clone(), small.repeat(10)]);
        drop(done);
        let started = Instant::now();
        let refused = read_unary(&mut several, LIMITS, None, &tight).await.unwrap().unwrap_err();
        assert_eq!((refused.why, started.elapsed(), tight.held()), (Refusal::TooLarge, Duration::ZERO, 0));
        // An empty body holds nothing.
        let (done, mut empty) = body(vec![]);
        drop(done);
        let (message, held) = read_unary(&mut empty, LIMITS, None, &memory).await.unwrap().unwrap();
        assert_eq!((message.len(), held.num_permits()), (0, 0));
    }

    #[test]
    fn a_stream_counts_what_stays_unread_and_is_refused_without_room() {
        let memory = MemoryBudget::new(100, MemoryKind::Requests);
        let mut messages = ClientMessages::new(1000, Some(Arc::clone(&memory)));
        let whole = grpc::frame(&[1; 35]).to_vec();
        // Whole messages taken at once hold nothing.
        messages.reader().push(&whole);
        assert!(messages.reader().next_message().is_some());
        messages.recount().unwrap();
        assert_eq!(memory.held(), 0);
        // The start of a message is counted, and so is what it grows to.
        messages.reader().push(&whole[..10]);
        messages.recount().unwrap();
        assert_eq!(memory.held(), 10);
        messages.reader().push(&whole[10..]);
        messages.reader().push(&whole[..20]);
        messages.recount().unwrap();
        assert_eq!(memory.held(), 60);
        // Taking one out gives back its share.
        assert_eq!(messages.reader().next_message().unwrap().len(), 40);
        messages.recount().unwrap();
        assert_eq!(memory.held(), 20);
        // No room: refused at once, saying why; what it held stays counted until it is dropped.
        let other = memory.try_hold(80).unwrap();
        messages.reader().push(&whole[20..30]);
        let refused = messages.recount().unwrap_err();
        assert_eq!(refused.why, Refusal::MemoryFull);
        assert_eq!(
            refused.failure.status(),
            (
                grpc::Code::Unavailable,
                "etcd-compat-proxy: the request messages the proxy holds reached --max-held-request-bytes (100 bytes) \
                 and this stream's next message found no room; the messages before it reached etcd; open the stream \
                 again, and if this is no flood of large requests, raise --max-held-request-bytes"
                    .to_owned()
            )
        );
        drop((messages, other));
        assert_eq!(memory.held(), 0);
        // The proxy's own messages are not counted.
        let mut own = ClientMessages::new(1000, None);
        own.reader().push(&whole[..10]);
        own.recount().unwrap();
        assert_eq!(memory.held(), 0);
    }

    /// Whether `timer` has stalled, polled now.
    fn stalled_now(timer: &mut StallTimer) -> bool {
        let waker = std::task::Waker::noop();
        timer.poll_stalled(&mut Context::from_waker(waker)).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn the_stall_timeout_counts_only_time_the_client_is_read() {
        let mut timer = StallTimer::new(Duration::from_secs(1));
        assert!(!stalled_now(&mut timer), "nothing held: never stalled");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!stalled_now(&mut timer));

        timer.restart(true);
        tokio::time::advance(Duration::from_millis(600)).await;
        // The proxy stops reading for far longer than the timeout: no stall of the client's.
        timer.pause();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!stalled_now(&mut timer), "stalled while the proxy was not reading");
        timer.resume();
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(!stalled_now(&mut timer), "600 + 300 ms read: not yet");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(stalled_now(&mut timer), "1 s read without growth: stalled");

        // Growth starts it anew; pausing twice counts from the first; a whole message stops it.
        timer.restart(true);
        tokio::time::advance(Duration::from_millis(900)).await;
        timer.pause();
        tokio::time::advance(Duration::from_secs(2)).await;
        timer.pause();
        tokio::time::advance(Duration::from_secs(2)).await;
        timer.resume();
        assert!(!stalled_now(&mut timer));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(stalled_now(&mut timer));
        timer.restart(false);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!stalled_now(&mut timer));
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (http::HeaderName::from_static(name), http::HeaderValue::from_static(value)))
            .collect()
    }

    #[test]
    fn only_grpc_requests_pass() {
        let grpc = headers(&[("content-type", "application/grpc")]);
        assert_eq!(check_headers(&http::Method::POST, &grpc), Ok(None));
        assert_eq!(check_headers(&http::Method::GET, &grpc), Err(NotGrpc("the method is not POST")));
        let text = headers(&[("content-type", "text/plain")]);
        assert_eq!(check_headers(&http::Method::POST, &text), Err(NotGrpc("the content-type is not application/grpc")));
        assert_eq!(
            check_headers(&http::Method::POST, &HeaderMap::new()),
            Err(NotGrpc("the content-type is not application/grpc"))
        );
        let bad_timeout = headers(&[("content-type", "application/grpc"), ("grpc-timeout", "abc")]);
        assert_eq!(
            check_headers(&http::Method::POST, &bad_timeout),
            Err(NotGrpc("the grpc-timeout header is malformed"))
        );
        let timeout = headers(&[("content-type", "application/grpc+proto"), ("grpc-timeout", "3S")]);
        let deadline = check_headers(&http::Method::POST, &timeout).unwrap().unwrap();
        assert!(deadline > Instant::now() + Duration::from_millis(2900));
    }
}
