//! Command-line definitions (clap). Validation into a [`crate::config::Config`] happens in
//! `config.rs`, before any connection is made.

use clap::{Args, Parser, Subcommand};

use crate::map::Profile;

/// `--version`: the crate version and the commit it was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("USERSYNC_COMMIT"),
    ")"
);

const EXAMPLES: &str = "\
Examples:
  export USERSYNC_SOURCE_URL_FILE=/etc/usersync/source-url   # or USERSYNC_SOURCE_URL, --source
  export USERSYNC_TARGET_URL_FILE=/etc/usersync/target-url
  usersync setup               # publication, slot, target tables, initial copy
  usersync run                 # the service
  usersync status              # exit 0 healthy, 3 lagging, 4 slot at risk, 5 broken
  usersync demo                # two throwaway local servers, nothing else needed

Documentation: README.md and docs/ (docs/options.md lists every option and variable).";

/// Keeps neon_auth.users_sync in step with an identity store's users table, through a
/// logical replication slot (pgoutput).
#[derive(Debug, Parser)]
#[command(name = "usersync", version = VERSION, about, long_about = None, after_help = EXAMPLES)]
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
    /// Create (or find) the publication, the slot and the target tables, and copy the users
    /// already in the table; idempotent.
    #[command(after_help = SETUP_EXAMPLES)]
    Setup(SetupArgs),
    /// Recreate a lost or dropped slot and copy the table again, reconciling the target:
    /// users absent from the source are soft-deleted. With --routes and --online ROUTE, copy
    /// one route again while run streams, reconciling it, without touching the slot.
    #[command(after_help = RESYNC_EXAMPLES)]
    Resync(ResyncArgs),
    /// Apply everything pending in the slot up to the source's current position, then exit.
    #[command(after_help = REPLAY_EXAMPLES)]
    Replay(ReplayArgs),
    /// Stream changes from the slot to the target until SIGINT/SIGTERM.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Report the slot, the checkpoint, the target's users and the lag, with a verdict:
    /// exit 0 healthy, 3 lagging, 4 slot at risk, 5 broken.
    #[command(after_help = STATUS_EXAMPLES)]
    Status(StatusArgs),
    /// Hard-delete users soft-deleted longer ago than --older-than, in small batches, so the
    /// ON DELETE rules of app tables fire (or --scrub their personal fields). Needs only
    /// the target.
    #[command(after_help = PURGE_EXAMPLES)]
    Purge(PurgeArgs),
    /// Drop the slot and publication usersync uses, and its checkpoint on the target.
    #[command(after_help = TEARDOWN_EXAMPLES)]
    Teardown {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(flatten)]
        routes: RoutesArgs,
        /// Confirm: the slot's unconsumed changes are lost.
        #[arg(long)]
        yes: bool,
    },
    /// Start two throwaway local PostgreSQL servers and replicate generated users between
    /// them, printing changes applied and lag; Ctrl-C stops and removes everything.
    #[command(after_help = DEMO_EXAMPLES)]
    Demo(DemoArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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

    #[command(flatten)]
    pub plaintext_password: PlaintextPasswordArgs,

    /// The users table on the source [default: the profile's: public.users (generic),
    /// auth.users (supabase), public.user_entity (keycloak), public.user (better-auth),
    /// public.ProjectUser (stack-auth)].
    #[arg(long, env = "USERSYNC_TABLE", value_name = "SCHEMA.NAME")]
    pub table: Option<String>,

    /// Which identity store the table belongs to, which decides how rows become users
    /// (docs/profiles.md).
    #[arg(
        long,
        env = "USERSYNC_PROFILE",
        default_value = "generic",
        value_parser = clap::builder::PossibleValuesParser::new(Profile::NAMES)
    )]
    pub profile: String,

    /// keycloak: the realm whose users are replicated, by name or id (required).
    #[arg(long, env = "USERSYNC_REALM")]
    pub realm: Option<String>,

    /// stack-auth: replicate only this tenancy (a uuid); by default every tenancy.
    #[arg(long, env = "USERSYNC_TENANCY_ID", value_name = "UUID")]
    pub tenancy_id: Option<String>,

    /// supabase, better-auth: replicate anonymous users too (skipped by default).
    #[arg(long, env = "USERSYNC_INCLUDE_ANONYMOUS")]
    pub include_anonymous: bool,

    /// Logical replication slot name on the source.
    #[arg(long, env = "USERSYNC_SLOT", default_value = "usersync")]
    pub slot: String,

    /// Publication name on the source.
    #[arg(long, env = "USERSYNC_PUBLICATION", default_value = "usersync")]
    pub publication: String,

    /// Copy into raw_json only these columns besides the keys the profile computes (an
    /// allow-list; comma-separated, spelled as in the catalog). A column named here is copied
    /// even if its name looks like a credential (password_changed_at). Columns not copied are
    /// not published either (PostgreSQL 15+). A name the table lacks stops setup and run
    /// (exit 78). Not with --exclude-columns.
    #[arg(
        long,
        env = "USERSYNC_INCLUDE_COLUMNS",
        value_name = "COLUMNS",
        value_delimiter = ',',
        conflicts_with = "exclude_columns"
    )]
    pub include_columns: Vec<String>,

    /// Also leave these columns out of raw_json (a deny-list, comma-separated, on top of the
    /// profile's rule, which leaves out any column whose name says credential: password, token,
    /// secret, pass, hash, salt, api_key, ...; see docs/source-and-target.md). A column the profile reads (the id, the email, ...) cannot be excluded, and a
    /// name the table lacks stops setup and run (exit 78). Columns not copied are not
    /// published either (PostgreSQL 15+).
    #[arg(
        long,
        env = "USERSYNC_EXCLUDE_COLUMNS",
        value_name = "COLUMNS",
        value_delimiter = ','
    )]
    pub exclude_columns: Vec<String>,

    /// generic: source column that holds the user id [default: id].
    #[arg(long, env = "USERSYNC_ID_COLUMN")]
    pub id_column: Option<String>,

    /// generic: source column for primary_email [default: email].
    #[arg(long, env = "USERSYNC_EMAIL_COLUMN")]
    pub email_column: Option<String>,

    /// generic: source column for display_name [default: display_name, else name].
    #[arg(long, env = "USERSYNC_DISPLAY_NAME_COLUMN")]
    pub display_name_column: Option<String>,

    /// generic: source column for signed_up_at_millis (a timestamp, date or integer
    /// milliseconds) [default: created_at].
    #[arg(long, env = "USERSYNC_SIGNED_UP_AT_COLUMN")]
    pub signed_up_at_column: Option<String>,
}

/// The opt-in to passwords readable on the network, for every command that connects.
#[derive(Debug, Clone, Args)]
pub struct PlaintextPasswordArgs {
    /// Answer a server on another machine that asks for the password in cleartext or as an md5
    /// hash without having proved who it is (no TLS, or TLS without a verified certificate).
    /// Refused by default: anyone on the network path could read or crack it. Prefer
    /// sslmode=verify-full or scram-sha-256.
    #[arg(long, env = "USERSYNC_ALLOW_PLAINTEXT_PASSWORD")]
    pub allow_plaintext_password: bool,
}

/// The lag target, for the commands that measure lag.
#[derive(Debug, Clone, Args)]
pub struct LagTargetArgs {
    /// Lag target that lag is reported against (e.g. 1s, 500ms).
    #[arg(
        long,
        env = "USERSYNC_LAG_TARGET",
        default_value = "1s",
        value_name = "DURATION"
    )]
    pub lag_target: String,
}

/// Fan-out: one slot feeding a target per tenancy.
#[derive(Debug, Clone, Args)]
pub struct RoutesArgs {
    /// A routes file (TOML) sending each tenancy (or value of another column) to a target
    /// of its own, through one slot; replaces --target (docs/fan-out.md).
    #[arg(long, env = "USERSYNC_ROUTES_FILE", value_name = "FILE")]
    pub routes: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub routes: RoutesArgs,

    /// Don't copy the users already in the table; replicate only changes made from now on.
    #[arg(long)]
    pub no_snapshot: bool,

    /// Create a failover slot (PostgreSQL 17+), synchronised to physical standbys so that
    /// replication survives a failover of the source.
    #[arg(long)]
    pub failover: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ResyncArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub routes: RoutesArgs,

    /// Copy the route so named again while usersync run streams (the slot and the other
    /// routes untouched), soft-deleting the users the source no longer has: for an evicted
    /// route, or a target that lost or gained rows. Needs --routes.
    #[arg(long, value_name = "ROUTE", requires = "routes")]
    pub online: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub routes: RoutesArgs,

    /// Print the pending changes as JSON lines (lsn, commit_time, op, id, raw_json) instead of
    /// applying them; the slot does not advance.
    #[arg(long)]
    pub dry_run: bool,

    /// Stop before the first transaction that commits at or after this position (e.g. 0/16B3748).
    #[arg(long, value_name = "LSN")]
    pub until_lsn: Option<crate::lsn::Lsn>,
}

/// The service's own options.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub routes: RoutesArgs,

    #[command(flatten)]
    pub lag: LagTargetArgs,

    /// Address for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "USERSYNC_METRICS_ADDR",
        default_value = "127.0.0.1:9753",
        value_name = "ADDR"
    )]
    pub metrics_addr: std::net::SocketAddr,

    /// How often to write a heartbeat on the source (pg_logical_emit_message), which measures
    /// lag while idle and keeps the slot advancing; `off` disables it.
    #[arg(
        long,
        env = "USERSYNC_HEARTBEAT_INTERVAL",
        default_value = "1s",
        value_name = "DURATION"
    )]
    pub heartbeat_interval: String,

    /// Reconnect when the source sends nothing (no data, no keepalive) for this long; a reply
    /// is requested after half of it. Like the server's wal_sender_timeout, for our side.
    #[arg(
        long,
        env = "USERSYNC_SOURCE_TIMEOUT",
        default_value = "60s",
        value_name = "DURATION"
    )]
    pub source_timeout: String,

    /// How much of the changes of uncommitted source transactions is held in memory; past
    /// it, the one holding the most is spilled to a file in TMPDIR until it commits.
    #[arg(
        long,
        env = "USERSYNC_SPILL_THRESHOLD",
        default_value = "16MB",
        value_name = "SIZE"
    )]
    pub spill_threshold: String,

    /// With --routes: a route whose target has been down this long stops holding the slot
    /// (the source's WAL is released) and its target must be copied again
    /// (docs/fan-out.md); by default a route holds the slot until it comes back.
    #[arg(
        long,
        env = "USERSYNC_EVICT_AFTER",
        value_name = "DURATION",
        requires = "routes"
    )]
    pub evict_after: Option<String>,

    /// With --routes: a route that is down while the source writes this much WAL past its
    /// position (e.g. 10GB) stops holding the slot and its target must be copied again
    /// (resync --online); by default a route holds the slot until it comes back.
    #[arg(
        long,
        env = "USERSYNC_EVICT_AFTER_WAL",
        value_name = "SIZE",
        requires = "routes"
    )]
    pub evict_after_wal: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub routes: RoutesArgs,

    #[command(flatten)]
    pub lag: LagTargetArgs,

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

    /// Where the running `usersync run` serves /metrics, for its last-minute lag figures.
    #[arg(
        long,
        env = "USERSYNC_METRICS_ADDR",
        default_value = "127.0.0.1:9753",
        value_name = "ADDR"
    )]
    pub metrics_addr: std::net::SocketAddr,
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

    #[command(flatten)]
    pub plaintext_password: PlaintextPasswordArgs,

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

    /// Serve /metrics, /healthz and /readyz here while the demo runs (e.g. 127.0.0.1:9753).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

const SETUP_EXAMPLES: &str = "\
Examples:
  usersync setup                                   # the generic profile, table public.users
  usersync setup --profile supabase                # auth.users
  usersync setup --profile keycloak --realm acme
  usersync setup --profile better-auth --table neon_auth.user
  usersync setup --no-snapshot                     # only changes from now on";

const RESYNC_EXAMPLES: &str = "\
Examples:
  usersync resync               # after the slot was lost or dropped, with run stopped
  usersync resync --routes routes.toml --online acme   # one route of a fan-out, while run streams
  usersync resync --slot tenant_a --profile stack-auth --tenancy-id 0b3e7f0c-5d2a-4c4e-9f6b-2d8a1c9e7b41";

const REPLAY_EXAMPLES: &str = "\
Examples:
  usersync replay --dry-run | jq .        # what is pending, as JSON lines; nothing applied
  usersync replay                          # apply it and exit (a cron job instead of run)
  usersync replay --until-lsn 16/B374D848";

const RUN_EXAMPLES: &str = "\
Examples:
  usersync run
  usersync run --metrics-addr 0.0.0.0:9753 --lag-target 500ms
  USERSYNC_LOG_FORMAT=json usersync run    # one JSON object per log line";

const STATUS_EXAMPLES: &str = "\
Examples:
  usersync status
  usersync status --json | jq .lag         # the JSON keys are listed in docs/commands.md
  usersync status || echo \"not healthy: exit $?\"";

const PURGE_EXAMPLES: &str = "\
Examples:
  usersync purge --older-than 30d --dry-run    # count only
  usersync purge --older-than 30d
  usersync purge --older-than 90d --scrub      # keep the rows, strip personal fields";

const DEMO_EXAMPLES: &str = "\
Examples:
  usersync demo
  usersync demo --rate 500 --duration 60s";

const TEARDOWN_EXAMPLES: &str = "\
Examples:
  usersync teardown           # says what it would drop, and exits 2
  usersync teardown --yes";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  usersync completions bash > /etc/bash_completion.d/usersync
  usersync completions zsh > \"${fpath[1]}/_usersync\"
  usersync completions fish > ~/.config/fish/completions/usersync.fish";
