//! `usersync run`: the service. SIGINT or SIGTERM finishes the open batch, confirms it to
//! the source and exits 0. Its tasks, spawned here: the signal listener, the HTTP endpoint,
//! systemd's watchdog when it has one, and (inside the replicator) one source monitor per
//! streaming session.
//!
//! Under systemd with `Type=notify` ([`crate::sdnotify`]) it says `READY=1` once the endpoint
//! is up and replication starts (a standby is a running service too: it only waits),
//! `STOPPING=1` when asked to stop, and, with `WatchdogSec=`, `WATCHDOG=1` while the run loop
//! makes progress (as `/healthz` answers): a hung loop stops feeding the watchdog, and systemd
//! restarts the service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::error::Error;
use crate::http;
use crate::metrics::Metrics;
use crate::replicator;
use crate::sdnotify::{self, Notifier};

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
    let systemd = systemd_notifier();
    let watchdog = systemd.clone().and_then(|systemd| {
        let interval = watchdog_interval()?;
        let metrics = Arc::clone(&metrics);
        Some(tokio::spawn(feed_watchdog(systemd, interval, metrics)))
    });
    let stopping = systemd.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested; finishing the open batch");
        if let Some(systemd) = &stopping {
            tell(systemd, sdnotify::STOPPING);
        }
        let _ = stop.send(true);
    });
    if let Some(systemd) = &systemd {
        tell(systemd, sdnotify::READY);
    }
    let reload = reload_on_hangup(config);
    let result = replicator::run_with_reload(config, metrics, shutdown, reload).await;
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    server.abort();
    result
}

/// With `--routes`: reads the routes file again on each SIGHUP and hands it to the
/// replicator, which adds its new routes while streaming (docs/fan-out.md). A file that is
/// not valid changes nothing and is said so. Without, SIGHUP is only logged.
fn reload_on_hangup(
    config: &Config,
) -> Option<watch::Receiver<Option<Arc<crate::routing::Routes>>>> {
    let (send, receive) = watch::channel(None);
    let path = config.routes_file.clone();
    let default_by = config.mapping.routing_column();
    let allowed = config.target.allow_plaintext_password;
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP: the routes file is read at start only");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            // Without --routes there is nothing to read again; SIGHUP (a `systemctl reload`)
            // must not stop the process as its default action would.
            let Some(path) = &path else {
                tracing::info!("SIGHUP: nothing to read again (no --routes)");
                continue;
            };
            let loaded = crate::routing::Routes::load_allowing(path, default_by, allowed).and_then(
                |routes| {
                    for route in &routes.routes {
                        route.target.check_session_endpoint().map_err(|source| {
                            Error::Config(format!(
                                "route {}: invalid target URL: {source}",
                                route.name
                            ))
                        })?;
                    }
                    Ok(routes)
                },
            );
            match loaded {
                Ok(routes) => {
                    tracing::info!("SIGHUP: routes file read again");
                    if send.send(Some(Arc::new(routes))).is_err() {
                        return;
                    }
                }
                Err(error) => tracing::error!(
                    error = %crate::error::report(&error),
                    "SIGHUP: the routes file is not valid; nothing changes"
                ),
            }
        }
    });
    config.routes_file.is_some().then_some(receive)
}

/// The notifier `$NOTIFY_SOCKET` asks for, if any. A socket usersync cannot use is worth a
/// warning, not a failure: systemd then says what it missed (a start timeout, say).
fn systemd_notifier() -> Option<Arc<Notifier>> {
    match Notifier::from_env() {
        Ok(notifier) => notifier.map(Arc::new),
        Err(error) => {
            tracing::warn!(error = %crate::error::report(&error), "cannot notify systemd");
            None
        }
    }
}

/// How often to feed systemd's watchdog, if it watches this process.
fn watchdog_interval() -> Option<Duration> {
    match sdnotify::watchdog_interval_from_env() {
        Ok(interval) => interval,
        Err(error) => {
            tracing::warn!(error = %crate::error::report(&error), "cannot feed systemd's watchdog");
            None
        }
    }
}

/// Tells systemd `message`; a failure is logged, since nothing else can be done about it.
fn tell(systemd: &Notifier, message: &str) {
    if let Err(error) = systemd.notify(message) {
        tracing::warn!(error = %crate::error::report(&error), "cannot notify systemd");
    }
}

/// Sends `WATCHDOG=1` every `interval` while the run loop makes progress, and stops while it
/// does not, so that systemd restarts a hung process; says so once per hang.
async fn feed_watchdog(systemd: Arc<Notifier>, interval: Duration, metrics: Arc<Metrics>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hung = false;
    let mut refused = false;
    loop {
        ticks.tick().await;
        let liveness = metrics.liveness();
        if liveness.is_alive() {
            hung = false;
            // Logged once until a send goes through again: a full queue refuses every tick.
            match systemd.notify(sdnotify::WATCHDOG) {
                Ok(()) => refused = false,
                Err(error) if !refused => {
                    refused = true;
                    tracing::warn!(error = %crate::error::report(&error), "cannot feed systemd's watchdog");
                }
                Err(_) => {}
            }
        } else if !hung {
            hung = true;
            tracing::error!(
                silent_s = liveness.silent_for().as_secs(),
                bound_s = liveness.bound().as_secs(),
                "the run loop shows no progress: no longer feeding systemd's watchdog, which \
                 restarts the service"
            );
        }
    }
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
