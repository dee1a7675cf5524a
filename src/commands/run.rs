//! `usersync run`: the service. SIGINT or SIGTERM finishes the open batch, confirms it to
//! the source and exits 0. Its tasks, spawned here: the signal listener, the HTTP endpoint,
//! and (inside the replicator) one source monitor per streaming session.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::error::Error;
use crate::http;
use crate::metrics::Metrics;
use crate::replicator;

pub async fn run(config: &Config, metrics_addr: SocketAddr) -> Result<(), Error> {
    let (stop, shutdown) = watch::channel(false);
    let metrics = Arc::new(Metrics::new(config.lag_target));
    metrics
        .liveness()
        .set_bound(replicator::liveness_bound(config.source_timeout));
    let (bound, server) = http::bind(metrics_addr, Arc::clone(&metrics), shutdown.clone())
        .await
        .map_err(|error| Error::Config(error.to_string()))?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let server = tokio::spawn(server);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested; finishing the open batch");
        let _ = stop.send(true);
    });
    let result = replicator::run(config, metrics, shutdown).await;
    server.abort();
    result
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM (systemd, Kubernetes).
pub async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
