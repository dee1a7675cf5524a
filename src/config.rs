//! Raw arguments → a validated [`Config`], before the runtime makes any connection, so a typo
//! fails in milliseconds with a precise message.

use std::fmt;
use std::time::Duration;

use postgres_protocol::escape::escape_identifier;

use crate::cli::ConnectionArgs;
use crate::conn::PgUrl;
use crate::error::Error;
use crate::map::GenericMapping;

/// Everything `setup`, `run` and `teardown` need, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: PgUrl,
    pub target: PgUrl,
    pub table: TableName,
    pub slot: String,
    pub publication: String,
    pub mapping: GenericMapping,
    pub lag_target: Duration,
}

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
        let source = resolve_url("source", args.source_url.as_deref(), "USERSYNC_SOURCE_URL")?;
        let target = resolve_url("target", args.target_url.as_deref(), "USERSYNC_TARGET_URL")?;
        if args.profile != "generic" {
            return Err(Error::Config(format!(
                "unknown profile {:?}: the profiles available are: generic",
                args.profile
            )));
        }
        validate_slot_name(&args.slot)?;
        if args.publication.is_empty() {
            return Err(Error::Config("--publication must not be empty".into()));
        }
        Ok(Config {
            source,
            target,
            table: args.table.parse()?,
            slot: args.slot.clone(),
            publication: args.publication.clone(),
            mapping: GenericMapping {
                id_column: args.id_column.clone(),
                email_column: Some(args.email_column.clone()),
                display_name_column: args.display_name_column.clone(),
                signed_up_at_column: Some(args.signed_up_at_column.clone()),
            },
            lag_target: parse_duration(&args.lag_target)?,
        })
    }
}

impl Config {
    /// [`Config::from_args`] for the commands that open a replication connection (`setup`,
    /// `run`): also refuses a source that cannot carry one, such as Neon's `-pooler` endpoint,
    /// before anything connects.
    pub fn for_replication(args: &ConnectionArgs) -> Result<Config, Error> {
        let config = Config::from_args(args)?;
        config
            .source
            .check_replication_endpoint()
            .map_err(|source| Error::Url {
                which: "source",
                source,
            })?;
        Ok(config)
    }
}

fn resolve_url(which: &'static str, given: Option<&str>, env: &str) -> Result<PgUrl, Error> {
    let text = match given {
        Some(text) => text.to_owned(),
        None => {
            let file_var = format!("{env}_FILE");
            let Some(path) = std::env::var_os(&file_var) else {
                return Err(Error::Config(format!(
                    "no {which} URL: pass --{which} URL, or set {env} or {file_var}"
                )));
            };
            std::fs::read_to_string(&path)
                .map_err(|e| {
                    Error::Config(format!(
                        "cannot read the {which} URL from {file_var}={}: {e}",
                        std::path::Path::new(&path).display()
                    ))
                })?
                .trim()
                .to_owned()
        }
    };
    text.parse::<PgUrl>()
        .map_err(|source| Error::Url { which, source })
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

#[cfg(test)]
mod tests {
    use super::*;

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

    fn connection_args(source: &str) -> ConnectionArgs {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from([
            "usersync",
            "run",
            "--source",
            source,
            "--target",
            "postgresql://u@ep-x-pooler.us-east-2.aws.neon.tech/db",
        ])
        .expect("valid arguments");
        match cli.command {
            crate::cli::Command::Run(args) => args,
            _ => unreachable!("parsed as run"),
        }
    }

    #[test]
    fn replication_commands_refuse_a_pooled_source() {
        let pooled = connection_args("postgresql://u:pw@ep-x-pooler.us-east-2.aws.neon.tech/db");
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
        // Commands that only run SQL may use it; so may the target of any command.
        assert!(Config::from_args(&pooled).is_ok());
        let direct = connection_args("postgresql://u:pw@ep-x.us-east-2.aws.neon.tech/db");
        assert!(Config::for_replication(&direct).is_ok());
    }

    #[test]
    fn validates_slot_names() {
        assert!(validate_slot_name("usersync_1").is_ok());
        for bad in ["", "Usersync", "user-sync", &"a".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad}");
        }
    }
}
