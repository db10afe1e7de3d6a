//! What the edgewise services (`edgewise-ratelimit`, `edgewise-control`) share as processes: an
//! HTTP/1.1 port served until they stop, and stopping on SIGTERM or SIGINT.

use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type Reply = Response<Full<Bytes>>;

/// Serves HTTP/1.1 on `listener` with `handle` until `stop` turns true.
pub async fn serve_http<H, F>(listener: TcpListener, handle: H, mut stop: watch::Receiver<bool>)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let handle = Arc::new(handle);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let reply = handle(req);
                async move { Ok::<_, std::convert::Infallible>(reply.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Waits for SIGTERM or SIGINT, then sets `stop` (the servers stop accepting and finish what
/// they have in flight).
pub async fn until_signal(name: &str, stop: watch::Sender<bool>) -> Result<(), String> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("{name}: stopping");
    let _ = stop.send(true);
    Ok(())
}
