//! The crate's error type, classified once: *transient* errors (the network, a restarting
//! server) are retried with backoff; *definite* ones (a wrong password, a missing privilege,
//! a table usersync cannot replicate) stop the process with advice and exit code 78, so a
//! supervisor does not restart it into the same wall.

use crate::apply::ApplyError;
use crate::conn::{redact_secrets, ConnectError, UrlError};
use crate::decode::DecodeError;
use crate::localpg::LocalPgError;
use crate::map::MapError;
use crate::source::SourceError;

/// Exit code for configuration and other definite errors (`EX_CONFIG` of sysexits.h).
pub const EXIT_DEFINITE: u8 = 78;
/// Exit code for failures that may pass (the process gave up or was stopped mid-retry).
pub const EXIT_FAILURE: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    /// Something another session holds, which it releases in time (a route's lock).
    #[error("{0}")]
    Busy(String),
    #[error("invalid {which} URL: {source}")]
    Url {
        which: &'static str,
        #[source]
        source: UrlError,
    },
    #[error("{which}: {source}")]
    Connect {
        which: &'static str,
        #[source]
        source: Box<ConnectError>,
    },
    #[error(transparent)]
    Source(Box<SourceError>),
    #[error(transparent)]
    Target(#[from] ApplyError),
    #[error("{}", decode_message(.0))]
    Decode(#[from] DecodeError),
    #[error("cannot map a source row to a user: {0}")]
    Map(#[from] MapError),
    #[error(transparent)]
    LocalPg(#[from] LocalPgError),
    /// The target holds the checkpoint of a slot that is gone or lost: the changes since
    /// then are missing, and only `resync` (a new copy that soft-deletes the users the source
    /// no longer has) brings the target back; a plain copy would leave deleted users live.
    #[error(
        "replication slot {slot} {state}, but the target holds its checkpoint (up to {checkpoint}): \
         the changes made since then never reached the target and the source no longer has \
         them; run usersync resync, which creates the slot again, copies the table and \
         soft-deletes the users the source no longer has (setup does not: users deleted \
         meanwhile would stay live)"
    )]
    ResyncNeeded {
        slot: String,
        /// What happened to the slot: "does not exist on the source", "has lost WAL …".
        state: String,
        checkpoint: crate::lsn::Lsn,
    },
    /// A slot without a checkpoint on this target that this target did not record creating
    /// (or that someone consumed from since): it may feed another usersync's target under
    /// the same name, so setup does not drop it.
    #[error(
        "replication slot {slot} exists on the source but this target did not create it (or \
         something consumed from it since): another usersync may use it; use another --slot, \
         or, if it is a leftover, drop it on the source: \
         SELECT pg_drop_replication_slot('{slot}')"
    )]
    SlotNotCreatedHere { slot: String },
    /// The target records a resync of the slot that did not finish: it deleted the checkpoint
    /// and did not write the new one. Only resync, which reconciles, may finish it.
    #[error(
        "an earlier usersync resync of slot {slot} did not finish (the target holds its record \
         in usersync.setup_progress and no checkpoint); run usersync resync again, which copies \
         the table and soft-deletes the users the source no longer has (setup does not: users \
         deleted meanwhile would stay live)"
    )]
    ResyncUnfinished { slot: String },
    /// The initial copy's own thread or runtime could not start, or stopped without an
    /// outcome (see `commands::initial_copy`).
    #[error("the initial copy could not run on a thread of its own: {0}")]
    CopyThread(#[source] std::io::Error),
    /// A request that got no answer at all: a stalled network or a hung server answers
    /// nothing, not even an error, and TCP keepalives do not notice a peer that still
    /// acknowledges.
    #[error(
        "the {which} did not answer ({what}) within {}s; the connection is taken for dead",
        after.as_secs()
    )]
    Unanswered {
        which: &'static str,
        what: &'static str,
        after: std::time::Duration,
    },
}

impl From<SourceError> for Error {
    fn from(error: SourceError) -> Self {
        Error::Source(Box::new(error))
    }
}

impl From<crate::source::ReplicationError> for Error {
    fn from(error: crate::source::ReplicationError) -> Self {
        SourceError::Replication(error).into()
    }
}

impl Error {
    /// A failed connection to the source or the target.
    pub fn connect(which: &'static str) -> impl FnOnce(ConnectError) -> Error {
        move |source| Error::Connect {
            which,
            source: Box::new(source),
        }
    }
}

impl Error {
    /// Whether reconnecting later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { source, .. } => source.is_transient(),
            Error::Source(error) => error.is_transient(),
            Error::Target(error) => error.is_transient(),
            Error::Unanswered { .. } | Error::Busy(_) | Error::CopyThread(_) => true,
            Error::Decode(DecodeError::Spill { full, .. }) => *full,
            Error::Config(_)
            | Error::Url { .. }
            | Error::Decode(_)
            | Error::Map(_)
            | Error::LocalPg(_)
            | Error::ResyncNeeded { .. }
            | Error::SlotNotCreatedHere { .. }
            | Error::ResyncUnfinished { .. } => false,
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        if self.is_transient() {
            EXIT_FAILURE
        } else {
            EXIT_DEFINITE
        }
    }
}

/// A stream that cannot be decoded is a bug to report; a spill file the disk refused is not.
fn decode_message(error: &DecodeError) -> String {
    match error {
        DecodeError::Spill { .. } => error.to_string(),
        _ => format!("cannot decode the replication stream (please report this): {error}"),
    }
}

/// Whether a tokio-postgres error is worth a retry: lost connections and I/O always are;
/// server errors by SQLSTATE (a serialization failure, a deadlock, a statement cancelled by
/// `statement_timeout` or an operator); anything else (a type mismatch, a bad statement) is a bug or a
/// configuration problem that a retry would only repeat.
pub fn is_transient_pg(error: &tokio_postgres::Error) -> bool {
    if let Some(db) = error.as_db_error() {
        return crate::source::replication::is_transient_sqlstate(db.code().code())
            || matches!(db.code().code(), "40001" | "40P01" | "57014" | "55P03");
    }
    error.is_closed()
        || std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>())
}

/// The error and its causes in one line, each cause once: some messages already quote
/// their cause, others leave it to the chain. This is how every error chain is printed and
/// logged, so it is the last place a password could slip through: whatever a cause quotes (a
/// server message, a dependency's error) goes through [`redact_secrets`].
pub fn report(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(source) = cause {
        let said = source.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = source.source();
    }
    // Server messages are the server's words: a hostile one could send terminal escapes.
    redact_secrets(&escape_controls(&text))
}

/// `text` with its control characters but newline and tab escaped (`\u{1b}`), for text that
/// carries a server's words to a terminal.
pub fn escape_controls(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c {
            '\n' | '\t' => vec![c],
            c if c.is_control() => c.escape_default().collect(),
            c => vec![c],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_escape_the_terminal_controls_a_server_may_send() {
        #[derive(Debug, thiserror::Error)]
        #[error("server said: \u{1b}[2Jgone\u{7}")]
        struct Hostile;
        let said = report(&Hostile);
        assert!(!said.chars().any(|c| c.is_control()), "{said:?}");
        assert!(said.contains("gone"), "{said}");
    }

    /// An error from outside usersync's control that quotes a URL, as a server message or a
    /// dependency's error might.
    #[derive(Debug, thiserror::Error)]
    #[error(
        "the server said: no such database in \"POSTGRESQL://u:s3cret@h/db\" with \
         password=s3cret given"
    )]
    struct Quoting;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start")]
    struct Outer(#[source] Quoting);

    #[test]
    fn reports_never_show_a_password_a_cause_quotes() {
        let report = report(&Outer(Quoting));
        assert_eq!(
            report,
            "cannot start: the server said: no such database in \"POSTGRESQL://u:***@h/db\" \
             with password=*** given"
        );
    }
}
