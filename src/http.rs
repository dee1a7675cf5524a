//! The HTTP endpoint: `/metrics` (OpenMetrics text), `/healthz` (the process is alive) and
//! `/readyz` (streaming and not broken), on `--metrics-addr`.

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
        .route("/healthz", get(|| async { "ok\n" }))
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

async fn ready_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
