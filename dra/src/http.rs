//! The one HTTP endpoint of every binary: Prometheus `/metrics`, `/healthz` (the process
//! serves) and `/readyz` (the component says it is ready), as the kubelet's probes and a
//! Prometheus scrape expect them.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::future::Future;
use std::sync::Arc;

/// The content type prometheus-client's text encoder writes.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Render = Arc<dyn Fn() -> String + Send + Sync>;
type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the endpoint serves.
#[derive(Clone)]
pub struct Endpoint {
    metrics: Render,
    ready: Ready,
}

impl Endpoint {
    /// `metrics` renders the exposition; `ready` answers `/readyz`.
    pub fn new(
        metrics: impl Fn() -> String + Send + Sync + 'static,
        ready: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        Endpoint {
            metrics: Arc::new(metrics),
            ready: Arc::new(ready),
        }
    }

    /// The routes, for serving or for tests.
    pub fn router(self) -> Router {
        let metrics = self.metrics.clone();
        let ready = self.ready.clone();
        Router::new()
            .route(
                "/metrics",
                get(move || {
                    let body = metrics();
                    async move { ([(header::CONTENT_TYPE, OPENMETRICS)], body) }
                }),
            )
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || {
                    let ready = ready();
                    async move {
                        if ready {
                            (StatusCode::OK, "ok\n").into_response()
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
                        }
                    }
                }),
            )
    }

    /// Serve on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        let endpoint = Endpoint::new(|| "up 1\n".into(), move || flag.load(Ordering::SeqCst));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(endpoint.serve(listener, async {
            let _ = stopped.await;
        }));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics.contains(OPENMETRICS) && metrics.ends_with("up 1\n"),
            "{metrics}"
        );
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
