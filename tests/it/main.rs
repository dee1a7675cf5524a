//! The integration suite: one test binary, real PostgreSQL servers started by the harness.
//!
//! Tests share one server (a source database and a target database per test, and a slot per
//! test), and start their own only when they must break or reconfigure it.

mod harness;

mod cli;
mod compat;
mod confirmation;
mod crash;
mod credentials;
mod docs;
mod errors;
mod faults;
mod ha;
mod lag;
mod lifecycle;
mod liveness;
mod neon_auth;
mod oracle;
mod profiles;
mod promtool;
mod replay;
mod replication;
mod restore;
mod resync;
mod routes;
mod schema_change;
mod security;
mod snapshot;
