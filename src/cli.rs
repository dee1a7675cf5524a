//! Command-line definitions (clap). Validation into a [`crate::config::Config`] happens in
//! `config.rs`, before any connection is made.

use clap::{Args, Parser, Subcommand};

/// Keeps neon_auth.users_sync in step with an identity store's users table, through a
/// logical replication slot (pgoutput).
#[derive(Debug, Parser)]
#[command(name = "usersync", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "USERSYNC_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create (or find) the publication, the slot and the target tables; idempotent.
    Setup(ConnectionArgs),
    /// Stream changes from the slot to the target until SIGINT/SIGTERM.
    Run(ConnectionArgs),
    /// Report the slot, the checkpoint, the target's users and the lag, with a verdict:
    /// exit 0 healthy, 3 lagging, 4 slot at risk, 5 broken.
    Status(StatusArgs),
    /// Hard-delete users soft-deleted longer ago than --older-than, in small batches, so the
    /// ON DELETE rules of app tables fire (or --scrub their personal fields). Needs only
    /// the target.
    Purge(PurgeArgs),
    /// Drop the slot and publication usersync uses, and its checkpoint on the target.
    Teardown {
        #[command(flatten)]
        connection: ConnectionArgs,
        /// Confirm: the slot's unconsumed changes are lost.
        #[arg(long)]
        yes: bool,
    },
    /// Start two throwaway local PostgreSQL servers and replicate generated users between
    /// them, printing changes applied and lag; Ctrl-C stops and removes everything.
    Demo(DemoArgs),
}

/// Where to replicate from and to, and how source rows map to users.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Source (identity store) URL, libpq style: postgresql://user:pass@host:5432/db?sslmode=verify-full
    #[arg(
        long = "source",
        env = "USERSYNC_SOURCE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub source_url: Option<String>,

    /// Target (Neon) URL, libpq style. Use the direct endpoint, not -pooler.
    #[arg(
        long = "target",
        env = "USERSYNC_TARGET_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub target_url: Option<String>,

    /// The users table on the source.
    #[arg(
        long,
        env = "USERSYNC_TABLE",
        default_value = "public.users",
        value_name = "SCHEMA.NAME"
    )]
    pub table: String,

    /// How source rows become users (only `generic` so far).
    #[arg(long, env = "USERSYNC_PROFILE", default_value = "generic")]
    pub profile: String,

    /// Logical replication slot name on the source.
    #[arg(long, env = "USERSYNC_SLOT", default_value = "usersync")]
    pub slot: String,

    /// Publication name on the source.
    #[arg(long, env = "USERSYNC_PUBLICATION", default_value = "usersync")]
    pub publication: String,

    /// Source column that holds the user id.
    #[arg(long, env = "USERSYNC_ID_COLUMN", default_value = "id")]
    pub id_column: String,

    /// Source column for primary_email.
    #[arg(long, env = "USERSYNC_EMAIL_COLUMN", default_value = "email")]
    pub email_column: String,

    /// Source column for display_name [default: display_name, else name].
    #[arg(long, env = "USERSYNC_DISPLAY_NAME_COLUMN")]
    pub display_name_column: Option<String>,

    /// Source column for signed_up_at_millis (a timestamp, date or integer milliseconds).
    #[arg(
        long,
        env = "USERSYNC_SIGNED_UP_AT_COLUMN",
        default_value = "created_at"
    )]
    pub signed_up_at_column: String,

    /// Lag target that lag is reported against (e.g. 1s, 500ms).
    #[arg(
        long,
        env = "USERSYNC_LAG_TARGET",
        default_value = "1s",
        value_name = "DURATION"
    )]
    pub lag_target: String,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Call the slot at risk when the WAL it may still fall behind (safe_wal_size) is below
    /// this (e.g. 512MB, 1GB).
    #[arg(
        long,
        env = "USERSYNC_MIN_SAFE_WAL_SIZE",
        default_value = "1GB",
        value_name = "SIZE"
    )]
    pub min_safe_wal_size: String,
}

#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    /// Target (Neon) URL, libpq style.
    #[arg(
        long = "target",
        env = "USERSYNC_TARGET_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub target_url: Option<String>,

    /// Retention: users soft-deleted longer ago than this go (e.g. 30d, 720h).
    #[arg(long, value_name = "DURATION")]
    pub older_than: String,

    /// Only count the users that would go.
    #[arg(long)]
    pub dry_run: bool,

    /// Keep the rows, but strip raw_json down to id and signed_up_at_millis.
    #[arg(long)]
    pub scrub: bool,

    /// Users per transaction.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub batch_size: u32,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Stop by itself after this long (e.g. 60s); by default it runs until Ctrl-C.
    #[arg(long, value_name = "DURATION")]
    pub duration: Option<String>,

    /// Generated source transactions per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,

    /// Lag target that lag is reported against.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub lag_target: String,
}
