//! Raw arguments → a validated [`Config`], before the runtime makes any connection, so a typo
//! fails in milliseconds with a precise message.

use std::ffi::OsString;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use postgres_protocol::escape::escape_identifier;

use crate::cli::{ConnectionArgs, PurgeArgs};
use crate::conn::PgUrl;
use crate::decode::DEFAULT_MEMORY_LIMIT;
use crate::error::Error;
use crate::map::selection::{EXCLUDE_OPTION, INCLUDE_OPTION};
use crate::map::{
    generic, BetterAuthMapping, ColumnSelection, GenericMapping, KeycloakMapping, Profile,
    StackAuthMapping, SupabaseMapping,
};
use crate::routing::Routes;

/// Everything `setup`, `run` and `teardown` need, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: PgUrl,
    pub target: PgUrl,
    pub table: TableName,
    pub slot: String,
    pub publication: String,
    /// The identity-store profile and its options: how rows become users.
    pub mapping: Profile,
    pub lag_target: Duration,
    /// How often `run` writes a heartbeat on the source; `None` turns heartbeats off.
    pub heartbeat_interval: Option<Duration>,
    /// A replication connection silent this long (no data, no keepalive) is taken for dead
    /// and replaced: a half-open connection must not stall replication forever.
    pub source_timeout: Duration,
    /// Bytes of uncommitted transactions' changes held in memory before one is spilled.
    pub spill_threshold: usize,
    /// The fan-out (`--routes`), shared by the configs of its routes; `None`: one target.
    pub routes: Option<Arc<Routes>>,
    /// The routes file, which `run` reads again on SIGHUP to add routes.
    pub routes_file: Option<std::path::PathBuf>,
    /// The route this config is for (see [`Config::route_configs`]); `None`: the one target,
    /// or the whole fan-out.
    pub route: Option<usize>,
    /// A fan-out's route down this long stops holding the slot (`--evict-after`); `None`:
    /// never.
    pub evict_after: Option<Duration>,
    /// A fan-out's route down with this many bytes of WAL written past its position stops
    /// holding the slot (`--evict-after-wal`); `None`: never.
    pub evict_after_wal: Option<u64>,
}

/// The lag target unless `--lag-target` says otherwise: Neon's promise for users_sync.
pub const DEFAULT_LAG_TARGET: Duration = Duration::from_secs(1);

/// The heartbeat interval unless `--heartbeat-interval` says otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The source timeout unless `--source-timeout` says otherwise: PostgreSQL's default
/// `wal_sender_timeout`, the same bound the server applies to us.
pub const DEFAULT_SOURCE_TIMEOUT: Duration = Duration::from_secs(60);

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// The name quoted for SQL text (DDL cannot take parameters).
    pub fn quoted(&self) -> String {
        format!(
            "{}.{}",
            escape_identifier(&self.schema),
            escape_identifier(&self.name)
        )
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl std::str::FromStr for TableName {
    type Err = Error;

    /// `schema.name`, or `name` in `public`. Names are taken literally (as the catalog
    /// spells them), so `"ProjectUser"` is written ProjectUser.
    fn from_str(text: &str) -> Result<Self, Error> {
        let (schema, name) = text.split_once('.').unwrap_or(("public", text));
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(Error::Config(format!(
                "invalid table name {text:?}: expected SCHEMA.NAME, e.g. public.users"
            )));
        }
        Ok(TableName {
            schema: schema.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl Config {
    /// Validates the arguments. URLs come from the option or environment variable, or from
    /// the file named by `USERSYNC_SOURCE_URL_FILE` / `USERSYNC_TARGET_URL_FILE` (secrets
    /// mounted by Kubernetes or systemd credentials).
    pub fn from_args(args: &ConnectionArgs) -> Result<Config, Error> {
        Config::routed_from_args(args, None)
    }

    /// [`Config::from_args`] with a routes file (`--routes`), which names every target.
    pub fn routed_from_args(
        args: &ConnectionArgs,
        routes_file: Option<&Path>,
    ) -> Result<Config, Error> {
        let mut source = resolve_url("source", args.source_url.as_deref(), "USERSYNC_SOURCE_URL")?;
        let allowed = args.plaintext_password.allow_plaintext_password;
        source.allow_plaintext_password = allowed;
        let mapping = profile_from_args(args)?;
        let (mut target, routes) = match routes_file {
            None => (
                resolve_url("target", args.target_url.as_deref(), "USERSYNC_TARGET_URL")?,
                None,
            ),
            Some(path) => {
                if args.target_url.is_some()
                    || std::env::var_os("USERSYNC_TARGET_URL_FILE").is_some()
                {
                    return Err(Error::Config(
                        "--routes names every target: drop --target (and unset \
                         USERSYNC_TARGET_URL and USERSYNC_TARGET_URL_FILE)"
                            .into(),
                    ));
                }
                if mapping.tenancy_filter().is_some() {
                    return Err(Error::Config(
                        "--routes picks the tenancies itself: drop --tenancy-id".into(),
                    ));
                }
                let routes = Routes::load_allowing(path, mapping.routing_column(), allowed)?;
                (routes.routes[0].target.clone(), Some(Arc::new(routes)))
            }
        };
        target.allow_plaintext_password = allowed;
        let table = args
            .table
            .as_deref()
            .unwrap_or(mapping.default_table())
            .parse()?;
        validate_slot_name(&args.slot)?;
        if args.publication.is_empty() {
            return Err(Error::Config("--publication must not be empty".into()));
        }
        Ok(Config {
            source,
            target,
            table,
            slot: args.slot.clone(),
            publication: args.publication.clone(),
            mapping,
            lag_target: DEFAULT_LAG_TARGET,
            heartbeat_interval: Some(DEFAULT_HEARTBEAT_INTERVAL),
            source_timeout: DEFAULT_SOURCE_TIMEOUT,
            spill_threshold: DEFAULT_MEMORY_LIMIT,
            routes,
            routes_file: routes_file.map(Path::to_path_buf),
            route: None,
            evict_after: None,
            evict_after_wal: None,
        })
    }

    /// The config of each target: the one target, or each route of the fan-out (its
    /// target, and its index in [`Config::route`]).
    pub fn route_configs(&self) -> Vec<Config> {
        match &self.routes {
            None => vec![self.clone()],
            Some(routes) => routes
                .routes
                .iter()
                .enumerate()
                .map(|(index, route)| Config {
                    target: route.target.clone(),
                    route: Some(index),
                    ..self.clone()
                })
                .collect(),
        }
    }

    /// The route's name, for messages and labels; `None` for the one target.
    pub fn route_name(&self) -> Option<&str> {
        let (routes, index) = (self.routes.as_ref()?, self.route?);
        Some(routes.routes[index].name.as_str())
    }

    /// What the target's checkpoint row (and the slot's lock there, and a setup's record) is
    /// keyed by: the slot, or `slot:route` for a route of a fan-out, so that one target may
    /// hold the checkpoints of several routes or slots. Slot names cannot hold a colon, so
    /// no route's key is another slot's.
    pub fn checkpoint_key(&self) -> String {
        match self.route_name() {
            None => self.slot.clone(),
            Some(route) => format!("{}:{route}", self.slot),
        }
    }
}

/// The profile `--profile` names, with its options; an option of another profile is an
/// error rather than silently ignored.
fn profile_from_args(args: &ConnectionArgs) -> Result<Profile, Error> {
    let column_options = [
        ("--id-column", &args.id_column),
        ("--email-column", &args.email_column),
        ("--display-name-column", &args.display_name_column),
        ("--signed-up-at-column", &args.signed_up_at_column),
    ];
    let only_for = |option: &str, profiles: &str| {
        Err(Error::Config(format!(
            "{option} applies to --profile {profiles} only, not {}",
            args.profile
        )))
    };
    if args.profile != "generic" {
        if let Some((option, _)) = column_options.iter().find(|(_, value)| value.is_some()) {
            return only_for(option, "generic");
        }
    }
    if args.realm.is_some() && args.profile != "keycloak" {
        return only_for("--realm", "keycloak");
    }
    if args.tenancy_id.is_some() && args.profile != "stack-auth" {
        return only_for("--tenancy-id", "stack-auth");
    }
    if args.include_anonymous && !["supabase", "better-auth"].contains(&args.profile.as_str()) {
        return only_for("--include-anonymous", "supabase or better-auth");
    }
    let columns = column_selection(args)?;
    Ok(profile_of_name(args)?.with_columns(columns))
}

/// `--include-columns` or `--exclude-columns` (clap refuses both); names are trimmed, and an
/// empty one (`a,,b`, a trailing comma) is refused rather than matched against nothing.
fn column_selection(args: &ConnectionArgs) -> Result<ColumnSelection, Error> {
    let names = |option: &str, given: &[String]| -> Result<Vec<String>, Error> {
        given
            .iter()
            .map(|name| match name.trim() {
                "" => Err(Error::Config(format!(
                    "{option} has an empty column name: give comma-separated names, e.g. \
                     {option} plan,locale"
                ))),
                name => Ok(name.to_owned()),
            })
            .collect()
    };
    Ok(
        match (&args.include_columns[..], &args.exclude_columns[..]) {
            ([], []) => ColumnSelection::Profile,
            (include, []) => ColumnSelection::Include(names(INCLUDE_OPTION, include)?),
            ([], exclude) => ColumnSelection::Exclude(names(EXCLUDE_OPTION, exclude)?),
            _ => {
                return Err(Error::Config(format!(
                    "{INCLUDE_OPTION} and {EXCLUDE_OPTION} do not go together: the allow-list \
                 already leaves every other column out"
                )))
            }
        },
    )
}

/// The profile `--profile` names, with the options that only it takes.
fn profile_of_name(args: &ConnectionArgs) -> Result<Profile, Error> {
    Ok(match args.profile.as_str() {
        "generic" => Profile::Generic(GenericMapping {
            id_column: args
                .id_column
                .clone()
                .unwrap_or_else(|| generic::DEFAULT_ID_COLUMN.to_owned()),
            email_column: Some(
                args.email_column
                    .clone()
                    .unwrap_or_else(|| generic::DEFAULT_EMAIL_COLUMN.to_owned()),
            ),
            display_name_column: args.display_name_column.clone(),
            signed_up_at_column: Some(
                args.signed_up_at_column
                    .clone()
                    .unwrap_or_else(|| generic::DEFAULT_SIGNED_UP_AT_COLUMN.to_owned()),
            ),
            ..GenericMapping::default()
        }),
        "supabase" => Profile::Supabase(SupabaseMapping {
            include_anonymous: args.include_anonymous,
            ..SupabaseMapping::default()
        }),
        "keycloak" => match args.realm.as_deref() {
            Some(realm) if !realm.is_empty() => Profile::Keycloak(KeycloakMapping::new(realm)),
            _ => {
                return Err(Error::Config(
                    "--profile keycloak needs --realm (USERSYNC_REALM): the realm whose users \
                     to replicate, by name or id (a Keycloak database holds every realm, \
                     including master and its administrators)"
                        .into(),
                ))
            }
        },
        "better-auth" => Profile::BetterAuth(BetterAuthMapping {
            include_anonymous: args.include_anonymous,
            ..BetterAuthMapping::default()
        }),
        "stack-auth" => Profile::StackAuth(StackAuthMapping {
            tenancy_id: args.tenancy_id.as_deref().map(tenancy_id).transpose()?,
            ..StackAuthMapping::default()
        }),
        other => {
            return Err(Error::Config(format!(
                "unknown profile {other:?}: the profiles available are: {}",
                Profile::NAMES.join(", ")
            )))
        }
    })
}

/// A Stack Auth tenancy id: a uuid, spelled as PostgreSQL prints it (lowercase, hyphens),
/// because usersync compares it with the text of the `"tenancyId"` column.
fn tenancy_id(text: &str) -> Result<String, Error> {
    let id = text.trim().to_ascii_lowercase();
    let hyphens = [8, 13, 18, 23];
    let uuid = id.len() == 36
        && id.char_indices().all(|(i, c)| {
            if hyphens.contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if uuid {
        Ok(id)
    } else {
        Err(Error::Config(format!(
            "--tenancy-id {text:?} is not a uuid; Stack Auth's tenancy ids look like \
             4f1b2c3d-5e6f-4a7b-8c9d-0e1f2a3b4c5d (the \"tenancyId\" column)"
        )))
    }
}

/// What `purge` needs: the target only, so it runs where the source is out of reach.
#[derive(Debug, Clone)]
pub struct PurgeConfig {
    pub target: PgUrl,
    /// Users soft-deleted longer ago than this go.
    pub older_than: Duration,
    pub action: PurgeAction,
    pub dry_run: bool,
    /// Users per target transaction.
    pub batch_size: i64,
}

/// What happens to a user past the retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeAction {
    /// Hard delete: the row goes, and the `ON DELETE` rules of app tables fire.
    Delete,
    /// The row stays; `raw_json` keeps only `id` and `signed_up_at_millis`.
    Scrub,
}

impl PurgeConfig {
    pub fn from_args(args: &PurgeArgs) -> Result<PurgeConfig, Error> {
        if args.batch_size == 0 {
            return Err(Error::Config("--batch-size must be at least 1".into()));
        }
        let mut target = resolve_url("target", args.target_url.as_deref(), "USERSYNC_TARGET_URL")?;
        target.allow_plaintext_password = args.plaintext_password.allow_plaintext_password;
        Ok(PurgeConfig {
            target,
            older_than: parse_duration(&args.older_than)?,
            action: if args.scrub {
                PurgeAction::Scrub
            } else {
                PurgeAction::Delete
            },
            dry_run: args.dry_run,
            batch_size: i64::from(args.batch_size),
        })
    }
}

impl Config {
    /// [`Config::from_args`] for the commands that replicate (`setup`, `run`, `replay`,
    /// `resync`): also refuses, before anything connects, a source that cannot carry a
    /// replication connection and a target that does not keep a session, such as Neon's
    /// `-pooler` endpoints.
    pub fn for_replication(args: &ConnectionArgs) -> Result<Config, Error> {
        Config::routed_for_replication(args, None)
    }

    /// [`Config::for_replication`] with a routes file: every route's target is checked.
    pub fn routed_for_replication(
        args: &ConnectionArgs,
        routes_file: Option<&Path>,
    ) -> Result<Config, Error> {
        let config = Config::routed_from_args(args, routes_file)?;
        config
            .source
            .check_replication_endpoint()
            .map_err(|source| Error::Url {
                which: "source",
                source,
            })?;
        for route in config.route_configs() {
            route
                .target
                .check_session_endpoint()
                .map_err(|source| match route.route_name() {
                    None => Error::Url {
                        which: "target",
                        source,
                    },
                    Some(name) => {
                        Error::Config(format!("route {name}: invalid target URL: {source}"))
                    }
                })?;
        }
        Ok(config)
    }
}

fn resolve_url(which: &'static str, given: Option<&str>, env: &str) -> Result<PgUrl, Error> {
    resolve_url_from(which, given, env, |name| std::env::var_os(name))
}

/// [`resolve_url`] with the environment as a function, for tests. `given` is the option, or
/// the variable `env` as clap read it.
fn resolve_url_from(
    which: &'static str,
    given: Option<&str>,
    env: &str,
    var_os: impl Fn(&str) -> Option<OsString>,
) -> Result<PgUrl, Error> {
    let file_var = format!("{env}_FILE");
    let file = var_os(&file_var);
    // Which one would win is a guess an operator should not have to make (and an empty
    // variable is still set: clap reads it as an empty URL).
    if file.is_some() && var_os(env).is_some() {
        return Err(Error::Config(format!(
            "both {env} and {file_var} are set; unset one of them (keep {file_var}: a file \
             keeps the password out of the environment)"
        )));
    }
    let text = match (given, file) {
        (Some(text), _) => text.to_owned(),
        (None, Some(path)) => read_url_file(which, &file_var, Path::new(&path))?,
        (None, None) => {
            return Err(Error::Config(format!(
                "no {which} URL: pass --{which} URL, or set {env} or {file_var}"
            )))
        }
    };
    text.parse::<PgUrl>()
        .map_err(|source| Error::Url { which, source })
}

/// The URL in the file `file_var` names, trimmed (Kubernetes and `echo >` add a newline). Warns,
/// without the contents, when other users may read the file.
fn read_url_file(which: &'static str, file_var: &str, path: &Path) -> Result<String, Error> {
    read_private_file(
        &format!("{which} URL"),
        &format!("{file_var}={}", path.display()),
        path,
        MAX_URL_FILE_BYTES,
    )
}

/// A file that holds a password (`what`: a URL, a routes file), named by `origin` (the
/// variable or option that points at it), trimmed; at most `max_bytes`. Warns, without the
/// contents, when other users may read it.
pub(crate) fn read_private_file(
    what: &str,
    origin: &str,
    path: &Path,
    max_bytes: u64,
) -> Result<String, Error> {
    let unreadable =
        |e: std::io::Error| Error::Config(format!("cannot read the {what} from {origin}: {e}"));
    // A FIFO or a device would block the open or never end: only a regular file (through
    // symlinks, as Kubernetes mounts secrets) is read. Checked before the open, so that a
    // device is not opened by mistake, and again on what was opened (`open_regular`), which
    // decides: the path may be swapped in between.
    let kind = std::fs::metadata(path).map_err(unreadable)?;
    if !kind.is_file() {
        return Err(not_regular(what, origin, path));
    }
    let mut file = open_regular(path).map_err(|e| {
        if e.kind() != std::io::ErrorKind::PermissionDenied {
            return unreadable(e);
        }
        use std::os::unix::fs::MetadataExt as _;
        // The process's own uid, without unsafe code: /proc/self belongs to it (Linux).
        let process_uid = std::fs::metadata("/proc/self").ok().map(|me| me.uid());
        Error::Config(format!(
            "cannot read the {what} from {origin}: {e}; {}",
            permission_advice(file_mode(&kind), kind.uid(), process_uid)
        ))
    })?;
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        // It was a regular file a moment ago: replaced while being opened.
        return Err(not_regular(what, origin, path));
    }
    if readable_by_others(&metadata) {
        tracing::warn!(
            file = origin,
            mode = %format!("{:04o}", file_mode(&metadata)),
            "the {what} file, which holds a password, may be read by other users; make \
             it readable by its owner only (chmod 600), or by root and a group (chown \
             root:GROUP, chmod 640; Kubernetes: fsGroup with defaultMode 0440)"
        );
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(&mut file, max_bytes + 1),
        &mut text,
    )
    .map_err(unreadable)?;
    if text.len() as u64 > max_bytes {
        return Err(Error::Config(format!(
            "{origin} is larger than {max_bytes} bytes, which no {what} is; point it at the \
             file that holds the {what}"
        )));
    }
    Ok(text.trim().to_owned())
}

/// Opens `path` for reading without blocking: a FIFO swapped in after the check of the path
/// opens at once (instead of waiting for a writer), and the caller's check of the opened
/// file refuses it. Reads of a regular file on a local filesystem ignore `O_NONBLOCK` (a
/// `/proc` file that honours it fails with `EAGAIN`, which is reported).
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

fn not_regular(what: &str, origin: &str, path: &Path) -> Error {
    let kind = if path.is_dir() {
        "a directory (a mounted secret is a directory of files)"
    } else {
        "not a regular file"
    };
    Error::Config(format!(
        "{origin} is {kind}; point it at the file that holds the {what}"
    ))
}

/// What to do about a URL file this process may not read: the usual cause is a secret
/// mounted for root (mode 0600) into a container that runs as another user (the image runs
/// as uid 10001).
fn permission_advice(mode: u32, owner_uid: u32, process_uid: Option<u32>) -> String {
    let me = match process_uid {
        Some(uid) => format!("usersync runs as uid {uid}"),
        None => "usersync runs as another user".to_owned(),
    };
    format!(
        "the file belongs to uid {owner_uid} with mode {mode:04o} and {me}: make it readable by \
         that user (chown it to that uid with chmod 600, or to root and a group of that user \
         with chmod 640; Docker: the image runs as uid 10001; Kubernetes: fsGroup with \
         defaultMode 0440)"
    )
}

/// More than any connection URL needs: a file past it is the wrong file.
pub(crate) const MAX_URL_FILE_BYTES: u64 = 64 * 1024;

fn file_mode(metadata: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    metadata.permissions().mode() & 0o7777
}

/// libpq's rule for a private key (`sslkey`), applied to a file with a password in it: no
/// access for group or others, except that a file root owns may be read by its group (root
/// sharing it with a service's group; Kubernetes mounts secrets so with `fsGroup`).
fn readable_by_others(metadata: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    exposed_by_mode(file_mode(metadata), metadata.uid())
}

fn exposed_by_mode(mode: u32, owner_uid: u32) -> bool {
    const ROOT: u32 = 0;
    /// Group and other permission bits.
    const GROUP_OR_OTHERS: u32 = 0o077;
    const GROUP_READ: u32 = 0o040;
    let forgiven = if owner_uid == ROOT { GROUP_READ } else { 0 };
    mode & GROUP_OR_OTHERS & !forgiven != 0
}

/// Slot names are restricted by PostgreSQL to lower-case letters, digits and underscores.
fn validate_slot_name(slot: &str) -> Result<(), Error> {
    const MAX_SLOT_NAME: usize = 63;
    let valid = !slot.is_empty()
        && slot.len() <= MAX_SLOT_NAME
        && slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "invalid slot name {slot:?}: use 1 to 63 lower-case letters, digits and underscores"
        )))
    }
}

/// `0s` or `off` turns heartbeats off; anything else is a duration.
pub fn parse_heartbeat_interval(text: &str) -> Result<Option<Duration>, Error> {
    if text == "off" {
        return Ok(None);
    }
    let interval = parse_duration(text)?;
    Ok(Some(interval).filter(|interval| !interval.is_zero()))
}

/// `--source-timeout`: a duration of at least [`MIN_SOURCE_TIMEOUT`].
pub fn parse_source_timeout(text: &str) -> Result<Duration, Error> {
    let timeout = parse_duration(text)?;
    if timeout < MIN_SOURCE_TIMEOUT {
        return Err(Error::Config(format!(
            "--source-timeout {text} is too short: use at least {}ms (the server needs a \
             round trip to answer a keepalive request)",
            MIN_SOURCE_TIMEOUT.as_millis()
        )));
    }
    Ok(timeout)
}

/// Shorter timeouts would take a slow round trip for a dead connection.
pub const MIN_SOURCE_TIMEOUT: Duration = Duration::from_millis(500);

/// Parses `1s`, `500ms`, `2m`, `1h`, `1.5s`.
pub fn parse_duration(text: &str) -> Result<Duration, Error> {
    let invalid = || {
        Error::Config(format!(
            "invalid duration {text:?}: use a number with a unit, e.g. 500ms, 1s, 5m, 1h"
        ))
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(invalid)?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        "d" => number * 86400.0,
        _ => return Err(invalid()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| invalid())
}

/// Parses a byte size with PostgreSQL's units (1024-based): `0`, `4096`, `512kB`, `64MB`,
/// `1GB`, `1TB`; the unit's case does not matter.
pub fn parse_byte_size(text: &str) -> Result<u64, Error> {
    let invalid = || {
        Error::Config(format!(
            "invalid size {text:?}: use a whole number of bytes or one with a unit, e.g. 512MB, 1GB"
        ))
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "kb" => 10,
        "mb" => 20,
        "gb" => 30,
        "tb" => 40,
        _ => return Err(invalid()),
    };
    number.checked_mul(1 << shift).ok_or_else(invalid)
}

/// Parses `--spill-threshold`: at least 64kB (PostgreSQL's floor for its own
/// `logical_decoding_work_mem`), so a typo cannot send every transaction to disk.
pub fn parse_spill_threshold(text: &str) -> Result<usize, Error> {
    let bytes = parse_byte_size(text)?;
    if bytes < 64 << 10 {
        return Err(Error::Config(format!(
            "--spill-threshold {text} is too small: use at least 64kB (the default is 16MB)"
        )));
    }
    usize::try_from(bytes)
        .map_err(|_| Error::Config(format!("--spill-threshold {text} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_timeout_has_a_floor() {
        assert_eq!(parse_source_timeout("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_source_timeout("100ms").is_err());
        assert!(parse_source_timeout("soon").is_err());
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["", "1", "s", "1x", "-1s", "1..2s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spill_threshold_has_a_floor() {
        assert_eq!(parse_spill_threshold("64kB").unwrap(), 64 << 10);
        assert_eq!(parse_spill_threshold("16MB").unwrap(), 16 << 20);
        assert!(parse_spill_threshold("1kB").is_err());
        assert!(parse_spill_threshold("lots").is_err());
    }

    #[test]
    fn parses_byte_sizes() {
        assert_eq!(parse_byte_size("0").unwrap(), 0);
        assert_eq!(parse_byte_size("4096").unwrap(), 4096);
        assert_eq!(parse_byte_size("512kB").unwrap(), 512 << 10);
        assert_eq!(parse_byte_size("64MB").unwrap(), 64 << 20);
        assert_eq!(parse_byte_size("1gb").unwrap(), 1 << 30);
        for bad in ["", "MB", "1.5GB", "-1", "1 GB", "1PB", "99999999999TB"] {
            assert!(parse_byte_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_table_names() {
        let table: TableName = "auth.users".parse().unwrap();
        assert_eq!(
            (table.schema.as_str(), table.name.as_str()),
            ("auth", "users")
        );
        let table: TableName = "users".parse().unwrap();
        assert_eq!(table.schema, "public");
        assert_eq!(
            "public.ProjectUser".parse::<TableName>().unwrap().quoted(),
            "\"public\".\"ProjectUser\""
        );
        assert!("a.b.c".parse::<TableName>().is_err());
        assert!(".users".parse::<TableName>().is_err());
    }

    fn profile_of(args: &[&str]) -> Result<Profile, Error> {
        use clap::Parser as _;
        let argv = ["usersync", "setup"].iter().chain(args);
        match crate::cli::Cli::try_parse_from(argv).expect("arguments parse") {
            crate::cli::Cli {
                command: crate::cli::Command::Setup(setup),
                ..
            } => profile_from_args(&setup.connection),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn an_unreadable_url_file_says_whose_it_is_and_who_asks() {
        let advice = permission_advice(0o600, 0, Some(10001));
        assert!(
            advice.starts_with(
                "the file belongs to uid 0 with mode 0600 and usersync runs as uid 10001"
            ),
            "{advice}"
        );
        assert!(advice.contains("chmod 640"), "{advice}");
        assert!(permission_advice(0o600, 0, None).contains("runs as another user"));
    }

    #[test]
    fn profiles_take_their_own_options() {
        assert_eq!(profile_of(&[]).unwrap(), Profile::default());
        assert_eq!(
            profile_of(&["--id-column", "user_id"]).unwrap(),
            Profile::Generic(GenericMapping {
                id_column: "user_id".into(),
                ..GenericMapping::default()
            })
        );
        assert_eq!(
            profile_of(&["--profile", "supabase", "--include-anonymous"]).unwrap(),
            Profile::Supabase(SupabaseMapping {
                include_anonymous: true,
                ..SupabaseMapping::default()
            })
        );
        assert_eq!(
            profile_of(&["--profile", "keycloak", "--realm", "acme"]).unwrap(),
            Profile::Keycloak(KeycloakMapping::new("acme"))
        );
        assert_eq!(
            profile_of(&["--profile", "better-auth"]).unwrap(),
            Profile::BetterAuth(BetterAuthMapping::default())
        );
        assert_eq!(
            profile_of(&[
                "--profile",
                "stack-auth",
                "--tenancy-id",
                "4F1B2C3D-5E6F-4A7B-8C9D-0E1F2A3B4C5D"
            ])
            .unwrap(),
            Profile::StackAuth(StackAuthMapping {
                tenancy_id: Some("4f1b2c3d-5e6f-4a7b-8c9d-0e1f2a3b4c5d".into()),
                ..StackAuthMapping::default()
            })
        );
        let refused = [
            (&["--profile", "keycloak"][..], "needs --realm"),
            (
                &["--profile", "supabase", "--realm", "x"],
                "--realm applies to",
            ),
            (
                &[
                    "--profile",
                    "keycloak",
                    "--realm",
                    "x",
                    "--include-anonymous",
                ],
                "--include-anonymous applies",
            ),
            (&["--include-anonymous"], "--include-anonymous applies"),
            (
                &["--profile", "better-auth", "--email-column", "mail"],
                "--email-column applies to --profile generic only",
            ),
            (
                &["--tenancy-id", "4f1b2c3d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"],
                "--tenancy-id applies to --profile stack-auth only",
            ),
            (
                &[
                    "--profile",
                    "stack-auth",
                    "--tenancy-id",
                    "'; DROP TABLE x; --",
                ],
                "is not a uuid",
            ),
        ];
        for (args, needle) in refused {
            let error = profile_of(args).unwrap_err().to_string();
            assert!(error.contains(needle), "{args:?}: {error}");
        }
    }

    #[test]
    fn every_profile_takes_a_column_allow_or_deny_list() {
        let selection = |args: &[&str]| profile_of(args).map(|p| p.columns().clone());
        assert_eq!(selection(&[]).unwrap(), ColumnSelection::Profile);
        assert_eq!(
            selection(&["--exclude-columns", "plan, locale"]).unwrap(),
            ColumnSelection::Exclude(vec!["plan".into(), "locale".into()])
        );
        assert_eq!(
            selection(&["--profile", "supabase", "--include-columns", "phone,aud"]).unwrap(),
            ColumnSelection::Include(vec!["phone".into(), "aud".into()])
        );
        let keycloak = profile_of(&[
            "--profile",
            "keycloak",
            "--realm",
            "acme",
            "--exclude-columns",
            "federation_link",
        ])
        .unwrap();
        assert_eq!(keycloak.name(), "keycloak");
        assert_eq!(
            keycloak.columns(),
            &ColumnSelection::Exclude(vec!["federation_link".into()])
        );
        assert_eq!(
            selection(&[
                "--profile",
                "stack-auth",
                "--include-columns",
                "lastActiveAt"
            ])
            .unwrap(),
            ColumnSelection::Include(vec!["lastActiveAt".into()])
        );
        let error = selection(&["--exclude-columns", "a,,b"]).unwrap_err();
        assert!(error.to_string().contains("empty column name"), "{error}");

        use clap::Parser as _;
        let both = crate::cli::Cli::try_parse_from([
            "usersync",
            "setup",
            "--include-columns",
            "a",
            "--exclude-columns",
            "b",
        ])
        .unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn each_profile_has_a_default_table() {
        let tables: Vec<TableName> = [
            Profile::default(),
            Profile::Supabase(SupabaseMapping::default()),
            Profile::Keycloak(KeycloakMapping::new("acme")),
            Profile::BetterAuth(BetterAuthMapping::default()),
            Profile::StackAuth(StackAuthMapping::default()),
        ]
        .iter()
        .map(|profile| profile.default_table().parse().unwrap())
        .collect();
        let names: Vec<String> = tables.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "public.users",
                "auth.users",
                "public.user_entity",
                "public.user",
                "public.ProjectUser"
            ]
        );
        assert_eq!(tables[3].quoted(), "\"public\".\"user\"");
    }

    fn connection_args(source: &str, target: &str) -> ConnectionArgs {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from([
            "usersync", "run", "--source", source, "--target", target,
        ])
        .expect("valid arguments");
        match cli.command {
            crate::cli::Command::Run(args) => args.connection,
            _ => unreachable!("parsed as run"),
        }
    }

    #[test]
    fn replication_commands_refuse_a_pooled_source_or_target() {
        const POOLED: &str = "postgresql://u:pw@ep-x-pooler.us-east-2.aws.neon.tech/db";
        const DIRECT: &str = "postgresql://u:pw@ep-x.us-east-2.aws.neon.tech/db";
        let pooled = connection_args(POOLED, DIRECT);
        let error = Config::for_replication(&pooled).expect_err("pooler refused");
        assert_eq!(error.exit_code(), crate::error::EXIT_DEFINITE);
        assert!(
            error.to_string().starts_with(
                "invalid source URL: host ep-x-pooler.us-east-2.aws.neon.tech is a pooled endpoint"
            ),
            "{error}"
        );
        assert!(
            error.to_string().contains("ep-x.us-east-2.aws.neon.tech"),
            "{error}"
        );
        // The target keeps the standby's session lock and a copy's temporary tables.
        let error = Config::for_replication(&connection_args(DIRECT, POOLED))
            .expect_err("pooled target refused");
        assert!(
            error.to_string().starts_with(
                "invalid target URL: host ep-x-pooler.us-east-2.aws.neon.tech is a pooled endpoint"
            ),
            "{error}"
        );
        assert!(
            error.to_string().contains("session advisory lock"),
            "{error}"
        );
        // Commands that only run SQL (status, purge, teardown) may use either.
        assert!(Config::from_args(&connection_args(POOLED, POOLED)).is_ok());
        assert!(Config::for_replication(&connection_args(DIRECT, DIRECT)).is_ok());
    }

    #[test]
    fn a_url_file_must_be_a_small_regular_file() {
        let dir = std::env::temp_dir().join(format!("usersync-url-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A directory (as a FIFO or a device would) is refused before it is opened.
        let error = read_url_file("source", "USERSYNC_SOURCE_URL_FILE", &dir).expect_err("a dir");
        assert!(error.to_string().contains("is a directory"), "{error}");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; 70 * 1024]).unwrap();
        let error = read_url_file("source", "USERSYNC_SOURCE_URL_FILE", &big).expect_err("big");
        assert!(
            error.to_string().contains("larger than 65536 bytes"),
            "{error}"
        );
        // A FIFO that replaces the file between the check and the open (as an attacker with
        // write access to the directory could): the open returns at once and is refused.
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let opened = open_regular(&fifo).expect("a FIFO opens without a writer");
        assert!(!opened.metadata().unwrap().is_file());
        let fine = dir.join("fine");
        std::fs::write(&fine, "postgresql://u@h/db\n").unwrap();
        assert_eq!(
            read_url_file("source", "USERSYNC_SOURCE_URL_FILE", &fine).unwrap(),
            "postgresql://u@h/db"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_url_and_its_file_variable_together_are_refused() {
        let resolve = |given: Option<&str>, set: &'static [&'static str]| {
            resolve_url_from("source", given, "USERSYNC_SOURCE_URL", |name| {
                set.contains(&name).then(|| OsString::from("/nonexistent"))
            })
        };
        let url = "postgresql://u@h/db";
        for given in [Some(url), None] {
            let error = resolve(given, &["USERSYNC_SOURCE_URL", "USERSYNC_SOURCE_URL_FILE"])
                .expect_err("ambiguous");
            assert_eq!(error.exit_code(), crate::error::EXIT_DEFINITE);
            assert!(
                error.to_string().starts_with(
                    "both USERSYNC_SOURCE_URL and USERSYNC_SOURCE_URL_FILE are set; unset one"
                ),
                "{error}"
            );
        }
        assert!(resolve(Some(url), &["USERSYNC_SOURCE_URL"]).is_ok());
        // The option wins over a file, as options win over the environment.
        assert!(resolve(Some(url), &["USERSYNC_SOURCE_URL_FILE"]).is_ok());
        let error = resolve(None, &["USERSYNC_SOURCE_URL_FILE"]).expect_err("no such file");
        assert!(
            error.to_string().starts_with(
                "cannot read the source URL from USERSYNC_SOURCE_URL_FILE=/nonexistent"
            ),
            "{error}"
        );
    }

    #[test]
    fn url_files_must_be_private_like_libpq_keys() {
        for (mode, owner, exposed) in [
            (0o600, 1000, false),
            (0o400, 1000, false),
            (0o640, 1000, true),
            (0o604, 1000, true),
            (0o644, 1000, true),
            (0o660, 1000, true),
            // Root may share a file with a group: Kubernetes' fsGroup and defaultMode 0440.
            (0o440, 0, false),
            (0o640, 0, false),
            (0o660, 0, true),
            (0o444, 0, true),
        ] {
            assert_eq!(
                exposed_by_mode(mode, owner),
                exposed,
                "{mode:o} of uid {owner}"
            );
        }
    }

    #[test]
    fn the_plaintext_password_opt_in_reaches_both_urls() {
        use clap::Parser as _;
        let config = |extra: &[&str]| {
            let argv = [
                "usersync",
                "status",
                "--source",
                "postgresql://u@db.example.com/db",
                "--target",
                "postgresql://u@neon.example.com/db",
            ];
            let cli =
                crate::cli::Cli::try_parse_from(argv.iter().chain(extra)).expect("valid arguments");
            let crate::cli::Command::Status(args) = cli.command else {
                unreachable!("parsed as status")
            };
            Config::from_args(&args.connection).expect("valid")
        };
        let default = config(&[]);
        assert!(!default.source.allow_plaintext_password);
        assert!(!default.target.allow_plaintext_password);
        let allowed = config(&["--allow-plaintext-password"]);
        assert!(allowed.source.allow_plaintext_password);
        assert!(allowed.target.allow_plaintext_password);
        // Not part of the URL: a redacted URL never carries it.
        assert_eq!(allowed.source.redacted(), default.source.redacted());
    }

    #[test]
    fn validates_slot_names() {
        assert!(validate_slot_name("usersync_1").is_ok());
        for bad in ["", "Usersync", "user-sync", &"a".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad}");
        }
    }
}
