//! The HTTP endpoint: `/metrics` (OpenMetrics text), `/healthz` (the run loop makes progress,
//! see [`crate::liveness`]) and `/readyz` (streaming and not broken), on `--metrics-addr`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Prometheus 3 negotiates this; older servers accept it too.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for /metrics: {source}; choose another --metrics-addr")]
pub struct HttpError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds the address now (so a taken port fails before replication starts) and returns the
/// bound address and the server future, which ends when `shutdown` turns true.
pub async fn bind(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>), HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .route("/readyz", get(ready_handler))
        .with_state(metrics);
    let server = async move {
        let stopped = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::warn!(error = %error, "the metrics endpoint stopped");
        }
    };
    Ok((local, server))
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], metrics.encode())
}

/// Fails once the run loop has shown no progress within the liveness bound: the endpoint
/// answers on its own task, so answering at all says nothing about the loop.
async fn health_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    let liveness = metrics.liveness();
    if liveness.is_alive() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        let (silent, bound) = (liveness.silent_for(), liveness.bound());
        if liveness.first_report_of_this_hang() {
            tracing::warn!(
                silent_s = silent.as_secs(),
                bound_s = bound.as_secs(),
                "healthz: the run loop shows no progress; answering 503 so that it is restarted"
            );
        }
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "hung: no progress for {:.1} s (bound {:.1} s)\n",
                silent.as_secs_f64(),
                bound.as_secs_f64()
            ),
        )
    }
}

async fn ready_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn healthz_fails_once_the_loop_shows_no_progress_within_the_bound() {
        let metrics = Arc::new(Metrics::new(Duration::from_secs(1)));
        metrics.liveness().set_bound(Duration::from_millis(300));
        let (_stop, shutdown) = watch::channel(false);
        let (addr, server) = bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&metrics),
            shutdown,
        )
        .await
        .unwrap();
        tokio::spawn(server);
        let healthy = get(addr, "/healthz").await;
        assert!(healthy.starts_with("HTTP/1.0 200"), "{healthy}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let hung = get(addr, "/healthz").await;
        assert!(hung.starts_with("HTTP/1.0 503"), "{hung}");
        assert!(hung.contains("\r\n\r\nhung: no progress for 0."), "{hung}");
        assert!(hung.ends_with(" s (bound 0.3 s)\n"), "{hung}");
        metrics.liveness().progress();
        let again = get(addr, "/healthz").await;
        assert!(again.starts_with("HTTP/1.0 200"), "{again}");
    }
}
