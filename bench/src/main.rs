//! `event-processor-bench`: parses the command line, loads the configuration
//! the way `event-processor` does (environment, then `.env`), and runs the
//! benchmark. `scripts/bench.sh` builds and runs it against fresh services.

use activity_event_bench::BenchArgs;
use activity_event_processor::config::{self, Config};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "event-processor-bench",
    version,
    about = "Measures every stage of event-processor beside its physical limit, on fresh databases"
)]
struct Cli {
    /// Read variables from this file instead of `./.env`.
    #[arg(long, value_name = "PATH")]
    env_file: Option<PathBuf>,
    #[command(flatten)]
    bench: BenchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = config::env_map(cli.env_file.as_deref()).and_then(|env| Config::from_env(&env));
    let config = match loaded {
        Ok(config) => config,
        Err(err) => {
            eprintln!("invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    // The benchmark migrates a dozen fresh databases: their lines are noise here.
    let log_level = format!(
        "{},activity_event_processor::outbox::migrate=warn",
        config.log_level
    );
    activity_event_processor::telemetry::init_logging(
        &log_level,
        config.log_format,
        config.secrets(),
    );
    let scrubber = config.clone();
    // One thread, as `event-processor` runs.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(activity_event_bench::run(config, cli.bench)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", scrubber.scrub(&format!("{err:#}")));
            ExitCode::from(1)
        }
    }
}
