//! usersync: keeps `neon_auth.users_sync` on a Neon (PostgreSQL) target in step with an
//! identity store's users table, through a logical replication slot.
//!
//! ```text
//!  source (identity store)                                          target (Neon)
//!  users table ─WAL─▶ slot (pgoutput) ─▶ source ─▶ decode ─▶ map ─▶ apply ─▶ neon_auth.users_sync
//!                      + publication     replication  pgoutput  row →   batch   + usersync.state
//!                                        connection   messages  raw_json upsert/ (checkpoint, same
//!                                                     → whole            soft    transaction)
//!                                                     transactions       delete
//!                          ▲                                              │
//!                          └──────── confirm up to the durable checkpoint ┘
//! ```
//!
//! - [`source`]: the replication connection (own client), catalog checks, slot and publication.
//! - [`decode`]: pgoutput bytes → owned messages → whole transactions (pure, no I/O).
//! - [`map`]: a source row → the Stack Auth-shaped `raw_json` of a user.
//! - [`apply`]: batches → SQL on the target, checkpoint in the same transaction.
//! - [`replicator`]: the service loop tying them together, with reconnects.
//! - [`lag`], [`metrics`], [`http`]: how late, what was applied, and `/metrics`.
//! - [`liveness`], [`sdnotify`]: whether the run loop makes progress, told to `/healthz` and
//!   to systemd.
//! - [`conn`]: libpq-style URLs, TLS, ordinary SQL connections.
//! - [`commands`]: one module per subcommand; [`cli`] and [`config`] parse and validate.
//! - [`localpg`]: throwaway local PostgreSQL servers for `demo` and the tests.

pub mod apply;
pub mod cli;
pub mod commands;
pub mod config;
pub mod conn;
pub mod decode;
pub mod error;
pub mod http;
pub mod lag;
pub mod liveness;
pub mod localpg;
pub mod lsn;
pub mod map;
pub mod metrics;
pub mod replicator;
pub mod routing;
pub mod sdnotify;
pub mod source;

pub use error::Error;
