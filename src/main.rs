//! The `usersync` binary: parse arguments, validate them, set up logging, run the command,
//! and turn its error into a message and an exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;
use usersync::cli::{Cli, Command, LogFormat};
use usersync::commands;
use usersync::commands::setup::SetupOptions;
use usersync::config::{
    parse_byte_size, parse_duration, parse_heartbeat_interval, parse_source_timeout,
    parse_spill_threshold, Config, PurgeConfig,
};
use usersync::conn::redact_secrets;
use usersync::error::{Error, EXIT_DEFINITE, EXIT_FAILURE};

/// Exit code for usage errors, as clap uses.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = parse_args();
    init_logging(cli.log_format);
    let service = matches!(cli.command, Command::Run(_));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("usersync: {}", redact_secrets(&format!("{error:#}")));
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Usage(message)) => {
            eprintln!("usersync: {}", redact_secrets(&message));
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Error(error)) => {
            let report = usersync::error::report(&error);
            if service {
                // The service's last log line, where its collector looks (JSON logs included).
                tracing::error!(error = %report, "usersync stopped");
            } else {
                eprintln!("usersync: {report}");
            }
            ExitCode::from(error.exit_code())
        }
    }
}

/// [`Cli::parse`], except that a usage error, which quotes the argument it could not place
/// (say a URL pasted without `--source`), has the passwords in it redacted, and that a wrong
/// value exits 78 like every other wrong setting (docs/commands.md, "Exit codes"): 2 is
/// left for a command line of the wrong shape.
fn parse_args() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: printed as they are, exit 0.
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            eprint!("{}", redact_secrets(&error.render().to_string()));
            let code = match error.kind() {
                ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::InvalidUtf8 => {
                    i32::from(EXIT_DEFINITE)
                }
                _ => error.exit_code(),
            };
            std::process::exit(code);
        }
    }
}

enum Failure {
    Usage(String),
    Error(Error),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::Error(error)
    }
}

/// Runs the command; `Ok` holds the exit code (0, or `status`'s verdict).
async fn dispatch(command: Command) -> Result<u8, Failure> {
    match command {
        Command::Setup(args) => {
            let options = SetupOptions {
                snapshot: !args.no_snapshot,
                failover: args.failover,
            };
            let config =
                Config::routed_for_replication(&args.connection, args.routes.routes.as_deref())?;
            commands::setup::setup(&config, options).await?
        }
        Command::Replay(args) => {
            let config =
                Config::routed_for_replication(&args.connection, args.routes.routes.as_deref())?;
            commands::replay::replay(&config, args.until_lsn, args.dry_run).await?
        }
        Command::Resync(args) => {
            let config =
                Config::routed_for_replication(&args.connection, args.routes.routes.as_deref())?;
            match &args.online {
                Some(route) => commands::resync::resync_online(&config, route).await?,
                None => commands::resync::resync(&config).await?,
            }
        }
        Command::Run(args) => {
            let mut config =
                Config::routed_for_replication(&args.connection, args.routes.routes.as_deref())?;
            config.heartbeat_interval = parse_heartbeat_interval(&args.heartbeat_interval)?;
            config.source_timeout = parse_source_timeout(&args.source_timeout)?;
            config.spill_threshold = parse_spill_threshold(&args.spill_threshold)?;
            config.lag_target = parse_duration(&args.lag.lag_target)?;
            config.evict_after = args
                .evict_after
                .as_deref()
                .map(parse_duration)
                .transpose()?;
            config.evict_after_wal = args
                .evict_after_wal
                .as_deref()
                .map(usersync::config::parse_byte_size)
                .transpose()?;
            commands::run::run(&config, args.metrics_addr).await?
        }
        Command::Status(args) => {
            let mut config =
                Config::routed_from_args(&args.connection, args.routes.routes.as_deref())?;
            config.lag_target = parse_duration(&args.lag.lag_target)?;
            let options = commands::status::StatusOptions {
                json: args.json,
                min_safe_wal_size: parse_byte_size(&args.min_safe_wal_size)?,
                metrics_addr: args.metrics_addr,
            };
            let verdict = commands::status::status(&config, options).await?;
            return Ok(verdict.exit_code());
        }
        Command::Purge(args) => {
            commands::purge::purge(&PurgeConfig::from_args(&args)?).await?;
        }
        Command::Teardown {
            connection,
            routes,
            yes,
        } => {
            let config = Config::routed_from_args(&connection, routes.routes.as_deref())?;
            if !yes {
                commands::teardown::preview(&config).await;
                return Err(Failure::Usage(format!(
                    "teardown drops replication slot {} and its unconsumed changes; run again \
                     with --yes to confirm",
                    config.slot
                )));
            }
            commands::teardown::teardown(&config).await?
        }
        Command::Demo(args) => commands::demo::demo(&args).await?,
        Command::Completions { shell } => clap_complete::generate(
            shell,
            &mut Cli::command(),
            "usersync",
            &mut std::io::stdout(),
        ),
    }
    Ok(0)
}

/// Logs go to stderr (stdout is for command output), filtered by `RUST_LOG`, `info` by default.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
