//! The slot's lock on the target: a session advisory lock that makes one `usersync run` per
//! slot the active one and the others standbys (see `hold_slot_lock` in the replicator).
//!
//! Its key is `hashtextextended('usersync:' || slot, 0)`. It is predictable on purpose: every
//! version and every process computes the same key, so versions running side by side during
//! an upgrade still exclude each other, and a secret key would only be obscurity. The price is
//! that any session that can connect to the target database can take the lock and keep every
//! usersync on standby while the slot retains WAL on the source. The defence is that this
//! shows: a standby logs who holds the lock, `usersync status` names the holder, and the
//! metrics say how long a process has stood by.
//!
//! How PostgreSQL shows the lock
//! (<https://www.postgresql.org/docs/current/view-pg-locks.html>): `pg_locks` has an advisory
//! lock on one `bigint` key as `classid` = the key's high 32 bits, `objid` = its low 32 bits,
//! `objsubid` = 1 (2 is a lock on two `int4` keys), in the database it was taken in. Every role
//! may read `pg_locks`. `pg_stat_activity` shows every session's `pid`, `usename` and
//! `application_name` to every role, but `client_addr` and `backend_start` only to the
//! session's own role, roles that are members of it, and `pg_read_all_stats`; to others they
//! are null, as is `client_addr` for a connection over a Unix socket.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};
use tokio_postgres::Client;

use super::ApplyError;

/// The rows of `pg_locks l` that are granted locks on the key in `slot_lock` (see the module
/// docs), for the queries here.
macro_rules! slot_lock_granted {
    () => {
        "l.locktype = 'advisory'
   AND l.granted
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid = ((slot_lock.key >> 32) & 4294967295)::oid
   AND l.objid = (slot_lock.key & 4294967295)::oid
   AND l.objsubid = 1"
    };
}

/// Takes the slot's lock if it is free; true if this session holds it now.
pub const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(hashtextextended('usersync:' || $1, 0))";

/// Takes the lock of `slot` if it is free, without waiting: `None` when this session holds
/// it now, else the sessions that do (for the error that names them).
pub async fn try_take(target: &Client, slot: &str) -> Result<Option<Vec<LockHolder>>, ApplyError> {
    let locked: bool = target
        .query_one(TRY_LOCK, &[&slot])
        .await
        .map_err(ApplyError::sql("taking the slot's lock"))?
        .get(0);
    if locked {
        return Ok(None);
    }
    holders(target, slot).await.map(Some)
}

/// The sessions that hold the lock of slot `$1` in this database. A shared lock (taken with
/// `pg_advisory_lock_shared`) keeps usersync out as well as an exclusive one, and several
/// sessions may hold it; a prepared transaction holds its locks without a session (no pid).
const HOLDERS: &str = concat!(
    "
WITH slot_lock AS (SELECT hashtextextended('usersync:' || $1, 0) AS key)
SELECT l.pid, l.mode, a.application_name, a.usename::text, host(a.client_addr), a.backend_start
  FROM slot_lock, pg_locks l
  LEFT JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE ",
    slot_lock_granted!(),
    "
 ORDER BY l.pid"
);

/// Fails (`1 / count(*)` divides by zero) unless the session of server process `$2`, started
/// at `$3` (a process id alone could be another's by now), holds the lock of slot `$1`
/// exclusively: the check a batch written on a connection that does not hold the lock makes
/// before it commits (see `TargetWriter::apply_after`).
pub const CHECK_HELD_BY: &str = concat!(
    "
WITH slot_lock AS (SELECT hashtextextended('usersync:' || $1, 0) AS key)
SELECT 1 / count(*)::int
  FROM slot_lock, pg_locks l
 WHERE ",
    slot_lock_granted!(),
    "
   AND l.pid = $2 AND l.mode = 'ExclusiveLock'
   AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.pid AND a.backend_start = $3)"
);

/// A session holding the slot's lock, as far as the role asking may see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockHolder {
    /// `None` for a prepared transaction.
    pub pid: Option<i32>,
    /// `ExclusiveLock`, or `ShareLock` for `pg_advisory_lock_shared`.
    pub mode: String,
    pub application_name: Option<String>,
    pub usename: Option<String>,
    /// Null without the right to see it, and for a Unix-socket connection.
    pub client_addr: Option<String>,
    /// Null without the right to see it.
    #[serde(serialize_with = "rfc3339")]
    pub backend_start: Option<DateTime<Utc>>,
}

/// The sessions holding the lock of `slot` on `target`, by pid.
pub async fn holders(target: &Client, slot: &str) -> Result<Vec<LockHolder>, ApplyError> {
    let rows = target
        .query(HOLDERS, &[&slot])
        .await
        .map_err(ApplyError::sql("reading who holds the slot's lock"))?;
    Ok(rows
        .iter()
        .map(|row| LockHolder {
            pid: row.get(0),
            mode: row.get(1),
            application_name: row.get(2),
            usename: row.get(3),
            client_addr: row.get(4),
            backend_start: row.get(5),
        })
        .collect())
}

/// One line per holder for logs and `status`: what is known, and what this role cannot see.
impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(pid) = self.pid else {
            return write!(f, "a prepared transaction ({})", self.mode);
        };
        write!(f, "pid {pid}")?;
        match (&self.application_name, &self.usename) {
            (None, None) => return write!(f, " (session ended meanwhile, {})", self.mode),
            (application_name, usename) => {
                let application_name = application_name.as_deref().unwrap_or_default();
                write!(f, " (application_name {application_name:?}")?;
                // A role name may hold any character, terminal escapes included.
                let usename = usename.as_deref().unwrap_or("-").escape_debug();
                write!(f, ", user {usename}")?;
            }
        }
        match (&self.client_addr, self.backend_start) {
            (Some(addr), Some(start)) => write!(f, ", from {addr}, since {}", rfc3339_text(start))?,
            (Some(addr), None) => write!(f, ", from {addr}")?,
            (None, Some(start)) => {
                write!(f, ", over a Unix socket, since {}", rfc3339_text(start))?
            }
            (None, None) => f.write_str(
                ", client address and start hidden from this role: pg_read_all_stats shows them",
            )?,
        }
        write!(f, ", {})", self.mode)
    }
}

/// The holders on one line, `-` for none.
pub fn describe(holders: &[LockHolder]) -> String {
    if holders.is_empty() {
        return "-".to_owned();
    }
    holders
        .iter()
        .map(LockHolder::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn rfc3339_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn rfc3339<S: Serializer>(time: &Option<DateTime<Utc>>, serializer: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => serializer.collect_str(&rfc3339_text(*time)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder() -> LockHolder {
        LockHolder {
            pid: Some(4242),
            mode: "ExclusiveLock".into(),
            application_name: Some("lock-squatter".into()),
            usename: Some("mallory".into()),
            client_addr: None,
            backend_start: None,
        }
    }

    #[test]
    fn says_what_the_role_may_see_and_what_it_may_not() {
        assert_eq!(
            holder().to_string(),
            "pid 4242 (application_name \"lock-squatter\", user mallory, client address and \
             start hidden from this role: pg_read_all_stats shows them, ExclusiveLock)"
        );
        let start = DateTime::parse_from_rfc3339("2025-05-27T04:49:57Z")
            .unwrap()
            .with_timezone(&Utc);
        let seen = LockHolder {
            client_addr: Some("10.0.0.5".into()),
            backend_start: Some(start),
            ..holder()
        };
        assert_eq!(
            seen.to_string(),
            "pid 4242 (application_name \"lock-squatter\", user mallory, from 10.0.0.5, since \
             2025-05-27T04:49:57.000Z, ExclusiveLock)"
        );
        let prepared = LockHolder {
            pid: None,
            application_name: None,
            usename: None,
            ..holder()
        };
        assert_eq!(
            describe(&[prepared, seen.clone()]),
            format!("a prepared transaction (ExclusiveLock); {seen}")
        );
        assert_eq!(describe(&[]), "-");
        let json = serde_json::to_value(&seen).unwrap();
        assert_eq!(json["backend_start"], "2025-05-27T04:49:57.000Z");
        assert!(serde_json::to_value(holder()).unwrap()["client_addr"].is_null());
    }
}
