//! The `usersync` binary: parse arguments, validate them, set up logging, run the command,
//! and turn its error into a message and an exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use usersync::cli::{Cli, Command, LogFormat};
use usersync::commands;
use usersync::config::Config;
use usersync::conn::redact_secrets;
use usersync::error::{Error, EXIT_FAILURE};

/// Exit code for usage errors, as clap uses.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = parse_args();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("usersync: {error:#}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("usersync: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Error(error)) => {
            let report = usersync::error::report(&error);
            tracing::error!(error = %report, "usersync stopped");
            eprintln!("usersync: {report}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// [`Cli::parse`], except that a usage error, which quotes the argument it could not place
/// (say a URL pasted without `--source`), has the passwords in it redacted.
fn parse_args() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: printed as they are, exit 0.
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            eprint!("{}", redact_secrets(&error.render().to_string()));
            std::process::exit(error.exit_code());
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

async fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Setup(args) => commands::setup::setup(&Config::for_replication(&args)?).await?,
        Command::Run(args) => commands::run::run(&Config::for_replication(&args)?).await?,
        Command::Teardown { connection, yes } => {
            let config = Config::from_args(&connection)?;
            if !yes {
                return Err(Failure::Usage(format!(
                    "teardown drops replication slot {} and its unconsumed changes; run again \
                     with --yes to confirm",
                    config.slot
                )));
            }
            commands::teardown::teardown(&config).await?
        }
        Command::Demo(args) => commands::demo::demo(&args).await?,
    }
    Ok(())
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
