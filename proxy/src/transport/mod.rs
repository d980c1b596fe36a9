//! HTTP/2 on the wire, toward etcd and the settings of both sides: one connection per member
//! and lane ([`connection`]), the halves of a stream ([`stream`]: etcd's answer as it arrives,
//! a body piped up with flow control), what goes up as a request body ([`request_body`]), a
//! small counted queue between tasks ([`mailbox`]), batched writes of small frames, and the
//! answers a client connection has not taken ([`unread`]). Depends on nothing else in the crate.

pub mod batched_writes;
pub mod connection;
pub mod mailbox;
pub mod request_body;
pub mod stream;
pub mod unread;

pub use batched_writes::BatchedWrites;
pub use connection::{Connection, ResponseFuture, Upload};
pub use mailbox::{mailbox, MailboxReceiver, MailboxSender};
pub use request_body::{feed, FeedReceiver, FeedSender, RequestBody};
pub use stream::{pipe, RecvBody};
pub use unread::{AnswerProgress, UnreadAnswers};

/// HTTP/2 flow-control window of one stream, on both sides: large answers (ranges, snapshots)
/// need large windows to stream at full speed, and many small watch streams need room not to
/// stall.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// The connection window clients get.
pub const CLIENT_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// The connection window toward etcd, far larger than the client side's: answers up to
/// `--max-buffered-response-bytes` leave it as soon as they arrive, but a larger answer (or a
/// snapshot) whose client stops reading holds up to [`STREAM_WINDOW`] of it, and it takes this
/// many such clients at once before the member's other streams wait.
pub const UPSTREAM_CONNECTION_WINDOW: u32 = 32 * STREAM_WINDOW;
/// Largest frame either side accepts: a large answer goes in few frames.
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Data one stream may have queued for sending: large requests and answers go out without
/// waiting on small steps.
pub const MAX_SEND_BUFFER: usize = 1024 * 1024;
