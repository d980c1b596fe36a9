//! Makes the HTTP/2 codec batch small DATA frames into one system call.
//!
//! h2 sends a DATA frame of 256 bytes or more as its own `writev` (zero-copy) when the socket
//! supports vectored writes, but copies frames under 1 KiB into its write buffer, which then
//! leaves with the other frames in one `write`, when it does not. Most etcd messages are a few
//! hundred bytes: measured under 64 concurrent 256-byte Puts, the upstream connection made about
//! twenty `writev` calls per read. Declaring no vectored-write support is what switches h2 to
//! batching; large frames (ranges, snapshots) are still written without copying.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection that tells the HTTP/2 codec to batch small frames.
pub struct BatchedWrites<S>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for BatchedWrites<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
