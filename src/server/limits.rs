//! Limits on the side listeners: the metrics endpoint and the plaintext
//! health port. Both are reachable by anyone who can reach the pod, and
//! neither needs more than a few connections (a scraper or two, the kubelet),
//! so each holds at most [`MAX_SIDE_CONNECTIONS`], and a client that connects
//! and sends nothing, or half a request, is closed after
//! [`HEADER_READ_TIMEOUT`] instead of holding a slot for good.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

/// Connections each side listener holds at most; more are closed at once.
/// Scrapers and probes open one or two each.
pub const MAX_SIDE_CONNECTIONS: usize = 64;
/// A request's headers (on the health port: its first bytes) must arrive
/// within this long; slow or stalled clients are closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A health-port connection is told to go away after this long (and closed
/// [`HEADER_READ_TIMEOUT`] later), so a client that opened one and went
/// quiet after its first bytes frees its slot.
pub const SIDE_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// A connection that holds one of its listener's slots until it closes.
pub struct Limited {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Limited {
    pub fn into_parts(self) -> (TcpStream, OwnedSemaphorePermit) {
        (self.stream, self._slot)
    }
}

/// The slots of one side listener.
#[derive(Clone)]
pub struct Slots(Arc<Semaphore>);

impl Slots {
    pub fn new() -> Self {
        Self(Arc::new(Semaphore::new(MAX_SIDE_CONNECTIONS)))
    }

    /// The next connection that gets a slot; connections past the cap are
    /// closed (the client retries; a flood cannot exhaust file descriptors).
    pub async fn accept(&self, listener: &TcpListener, name: &'static str) -> Limited {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, listener = name, "a listener failed to accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.0.clone().try_acquire_owned() {
                Ok(slot) => {
                    return Limited {
                        stream,
                        _slot: slot,
                    }
                }
                Err(_) => debug!(
                    %peer,
                    listener = name,
                    max = MAX_SIDE_CONNECTIONS,
                    "too many connections; closing a new one"
                ),
            }
        }
    }
}

impl Default for Slots {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the client sent its first byte within [`HEADER_READ_TIMEOUT`]
/// (HTTP/2 has no header-read timeout of its own in hyper).
pub async fn sends_in_time(connection: &Limited) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(HEADER_READ_TIMEOUT, connection.stream.peek(&mut byte)).await,
        Ok(Ok(n)) if n > 0
    )
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}
