//! Which PostgreSQL versions usersync works with, as a source and as a target, and the
//! refusal of the others at connection time.
//!
//! - Source: 14 and newer. 14 brought pgoutput protocol 2, which streams large in-progress
//!   transactions (bounded memory on the server and here) and carries logical messages, which
//!   are our heartbeats. Publication row filters (15) and failover slots (17) are not needed.
//! - Target: 14 and newer, the versions tested (`scripts/compat-matrix.sh`). Neon's
//!   `neon_auth.users_sync` uses stored generated columns, which need 12.
//!
//! Versions above the newest tested one are let through: PostgreSQL keeps these protocols
//! and catalogs compatible, and refusing a new release would be the worse failure.

use tokio_postgres::Client;

use crate::apply::ApplyError;
use crate::error::Error;
use crate::source::SourceError;

/// Oldest source version: pgoutput protocol 2 (streaming, messages).
pub const MIN_SOURCE_VERSION_NUM: u32 = 140_000;

/// Oldest target version: the oldest tested.
pub const MIN_TARGET_VERSION_NUM: u32 = 140_000;

/// The side of the replication a server is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Target,
}

/// The server's `server_version_num` (e.g. 150018 for 15.18).
pub async fn server_version_num(client: &Client) -> Result<u32, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?;
    let version: i32 = row.get(0);
    Ok(u32::try_from(version).unwrap_or(0))
}

/// Refuses a source server of an unsupported version; returns its version.
pub async fn check_source(client: &Client) -> Result<u32, Error> {
    let version = server_version_num(client)
        .await
        .map_err(SourceError::sql("reading the source's server version"))?;
    check_supported(Role::Source, version)?;
    Ok(version)
}

/// Refuses a target server of an unsupported version; returns its version.
pub async fn check_target(client: &Client) -> Result<u32, Error> {
    let version = server_version_num(client)
        .await
        .map_err(ApplyError::sql("reading the target's server version"))?;
    check_supported(Role::Target, version)?;
    Ok(version)
}

/// A definite error for a server version usersync does not support in `role`.
pub fn check_supported(role: Role, version_num: u32) -> Result<(), Error> {
    let major = version_num / 10_000;
    match role {
        Role::Source if version_num < MIN_SOURCE_VERSION_NUM => Err(Error::Config(format!(
            "PostgreSQL {major} is not supported as a source: usersync needs PostgreSQL {} or \
             newer, whose pgoutput protocol 2 streams large transactions and carries the \
             heartbeat messages; upgrade the identity store's PostgreSQL",
            MIN_SOURCE_VERSION_NUM / 10_000
        ))),
        Role::Target if version_num < MIN_TARGET_VERSION_NUM => Err(Error::Config(format!(
            "PostgreSQL {major} is not supported as a target: usersync is tested with \
             PostgreSQL {} and newer; use a newer target (every Neon project is 14 or newer)",
            MIN_TARGET_VERSION_NUM / 10_000
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_old_sources_by_major_version() {
        let message = check_supported(Role::Source, 130_016)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("PostgreSQL 13 is not supported as a source: "),
            "{message}"
        );
        assert!(check_supported(Role::Source, 140_000).is_ok());
        assert!(check_supported(Role::Source, 180_004).is_ok());
        assert!(check_supported(Role::Source, 190_000).is_ok());
    }

    #[test]
    fn refuses_old_targets_by_major_version() {
        let message = check_supported(Role::Target, 120_022)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("PostgreSQL 12 is not supported as a target: "),
            "{message}"
        );
        assert!(check_supported(Role::Target, 140_023).is_ok());
    }
}
