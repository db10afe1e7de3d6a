//! A connection let in by a [`Gate`]: counted while it lives, and closed when no byte moves
//! either way for the idle timeout (a peer gone silent, or one that never reads what it is sent).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::gate::{Closed, Gate, Permit};

pub struct Conn {
    stream: TcpStream,
    /// Counts the connection at its gate until dropped.
    _permit: Permit,
    gate: Arc<Gate>,
    idle: Duration,
    /// When a byte last moved.
    active: Instant,
    /// Wakes the connection's task when it may have been idle too long; moved on lazily.
    timer: Pin<Box<Sleep>>,
}

impl Conn {
    pub(crate) fn new(stream: TcpStream, permit: Permit, gate: Arc<Gate>) -> Conn {
        let idle = gate.limits.idle_timeout;
        let now = Instant::now();
        Conn { stream, _permit: permit, gate, idle, active: now, timer: Box::pin(tokio::time::sleep_until(now + idle)) }
    }

    /// The peer's address.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.stream.peer_addr().ok()
    }

    /// Called when the stream is not ready: an error once the connection has been idle too long.
    fn idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.active + self.idle;
            if deadline <= Instant::now() {
                self.gate.closed(Closed::IdleTimeout);
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.active = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.idle(cx).map(Err),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, data) {
            Poll::Ready(result) => {
                if result.as_ref().is_ok_and(|n| *n > 0) {
                    self.active = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.idle(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}
