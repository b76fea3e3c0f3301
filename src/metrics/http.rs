//! The `/metrics` endpoint on `metrics_address`, as Go's daemon serves it (plain HTTP, the
//! Prometheus text format). Anyone who can reach the address can scrape it, so it is bounded
//! like everything else facing the network: a few connections at a time, each with deadlines.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::Metrics;

/// Scrapes served at once; a connection past that is closed at once.
const MAX_CONNECTIONS: usize = 16;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection (keep-alive included) is closed after this, whatever it does.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("listen for metrics on {address}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
}

/// The running endpoint; stops serving when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Where it listens (the port chosen when `metrics_address` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `address` (`host:port`) and serves `GET /metrics` from `metrics` until the
/// returned server is dropped. A bind failure is returned, not logged: a daemon configured to
/// export metrics that cannot should not start silently without them (Go's exits too).
pub async fn serve(address: &str, metrics: Arc<Metrics>) -> Result<MetricsServer, MetricsError> {
    let bind_err = |source| MetricsError::Bind {
        address: address.to_string(),
        source,
    };
    let listener = TcpListener::bind(address).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "metrics endpoint: too many connections, closing one");
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection ended"),
                    Err(_) => tracing::debug!(%peer, "metrics connection closed at its deadline"),
                    Ok(Ok(())) => {}
                }
            });
        }
    });
    tracing::info!(address = %addr, "serving metrics on /metrics");
    Ok(MetricsServer { addr, task })
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let reply = |status, content_type, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => reply(
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            metrics.encode(),
        ),
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 page not found\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_404_elsewhere() {
        let m = Arc::new(Metrics::new());
        m.prepared_fallback("labels");
        let server = serve("127.0.0.1:0", m).await.expect("serve");
        let ok = get(server.local_addr(), "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(
            ok.contains(
                r#"stargz_snapshotter_prepares_total{snapshot="fallback",reason="labels"} 1"#
            ),
            "{ok}"
        );
        let missing = get(server.local_addr(), "/debug/pprof").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    }

    #[tokio::test]
    async fn an_address_in_use_is_an_error() {
        let first = serve("127.0.0.1:0", Arc::new(Metrics::new()))
            .await
            .expect("serve");
        let again = serve(&first.local_addr().to_string(), Arc::new(Metrics::new())).await;
        assert!(matches!(again, Err(MetricsError::Bind { .. })), "{again:?}");
    }
}
