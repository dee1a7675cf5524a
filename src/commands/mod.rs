//! One module per subcommand. Each takes a validated configuration and returns the crate's
//! error, so `main` only maps errors to exit codes.

pub mod demo;
mod initial_copy;
pub mod purge;
pub mod replay;
pub mod resync;
pub mod run;
pub mod setup;
pub mod status;
pub mod teardown;
pub mod units;

use crate::conn::{self, PgUrl};
use crate::error::Error;
use crate::replicator::APPLICATION_NAME;

/// An ordinary SQL connection to the source or the target, with the error naming which.
pub(crate) async fn connect(
    which: &'static str,
    url: &PgUrl,
) -> Result<tokio_postgres::Client, Error> {
    conn::sql::connect(url, APPLICATION_NAME)
        .await
        .map_err(Error::connect(which))
}
