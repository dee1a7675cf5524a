//! `usersync run`: the service. SIGINT or SIGTERM finishes the open batch, confirms it to
//! the source and exits 0.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::error::Error;
use crate::progress::Progress;
use crate::replicator;

pub async fn run(config: &Config) -> Result<(), Error> {
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested; finishing the open batch");
        let _ = stop.send(true);
    });
    replicator::run(config, Arc::new(Progress::default()), shutdown).await
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
