//! The source side: the replication connection, the catalog checks, publication and slot
//! management done over ordinary SQL, and the heartbeat/slot monitor.

pub mod catalog;
pub mod monitor;
pub mod publication;
pub mod replication;
pub mod snapshot;
pub mod wire;

pub use replication::{ReplicationConnection, ReplicationError, ReplicationStream, SystemIdentity};

/// Errors of the source side that are not protocol errors of the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source: {context} failed: {source}")]
    Sql {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// A problem someone has to fix; the text says how.
    #[error("{0}")]
    Definite(String),
}

impl SourceError {
    /// Wraps a tokio-postgres error with what usersync was doing.
    pub fn sql(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
        move |source| SourceError::Sql { context, source }
    }

    /// Whether reconnecting may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Sql { source, .. } => crate::error::is_transient_pg(source),
            SourceError::Replication(error) => error.is_transient(),
            SourceError::Definite(_) => false,
        }
    }
}
