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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Limits;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection through a gate with a 200 ms idle timeout, and its peer.
    async fn pair() -> (Conn, TcpStream, Arc<Gate>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, addr) = listener.accept().await.unwrap();
        let gate = Gate::new("test", Limits { idle_timeout: Duration::from_millis(200), ..Limits::default() });
        let permit = gate.admit(addr.ip()).unwrap();
        (Conn::new(stream, permit, gate.clone()), peer, gate)
    }

    #[tokio::test]
    async fn a_connection_where_nothing_moves_is_closed_and_one_where_bytes_move_is_not() {
        let (mut conn, mut peer, gate) = pair().await;
        let mut buf = [0u8; 16];
        // Bytes every 100 ms for 600 ms: never idle for 200 ms.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peer.write_all(b"x").await.unwrap();
            assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        }
        let start = Instant::now();
        let error = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(190) && waited < Duration::from_millis(600), "{waited:?}");
        assert_eq!(gate.open(), 1, "counted until dropped");
        drop(conn);
        assert_eq!(gate.open(), 0);
        let mut out = String::new();
        crate::gate::render("t", &[gate], &mut out);
        assert!(out.contains("t_connections_closed_total{port=\"test\",reason=\"idle_timeout\"} 1\n"), "{out}");
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_stalls_the_writes_until_the_idle_timeout() {
        let (mut conn, _peer, _gate) = pair().await;
        let chunk = vec![0u8; 1 << 20];
        let start = Instant::now();
        let error = loop {
            if let Err(e) = conn.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    }
}
