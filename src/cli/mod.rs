//! The command line: parse, load and validate configuration, dispatch.

pub mod dead_letters;
pub mod decode;
pub mod examples;
pub mod flags;
pub mod generate;
pub mod hints;
pub mod kafka;
pub mod observing;
pub mod prune;
pub mod rebuild;
pub mod run;
pub mod show;
pub mod status;
pub mod verify;

use crate::config::{self, Config, ConfigError, EnvMap, Flag};
use crate::counters::Stats;
use crate::outbox;
use crate::stats_file::StatsFile;
use crate::telemetry::Chain;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Exit status for a configuration problem (as for a usage error).
pub const EXIT_CONFIG: u8 = 2;
/// Exit status for a failure at run time (database unreachable, ...).
pub const EXIT_FAILURE: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "event-processor",
    version,
    about = "Keeps the activity read models in MongoDB in step with the PostgreSQL outbox"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags that override the environment (and `.env`).
#[derive(Args, Debug, Default)]
pub struct GlobalArgs {
    /// Read variables from this file instead of `./.env`.
    #[arg(long, global = true, value_name = "PATH")]
    pub env_file: Option<PathBuf>,
    #[command(flatten)]
    pub flags: flags::Overrides<flags::Global>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply the outbox schema migrations (safe to run again, and from several processes).
    Migrate,
    /// Insert the four seed events (a user, a rename, an activity, a join) if missing.
    Seed,
    /// Summarize the outbox (rows per status, oldest pending event, highest sequence_id),
    /// the read models, and the readiness checks of the configured source, looked at
    /// once (and a running process's /readyz on METRICS_ADDR, if one answers there).
    ///
    /// Exit status: 0 once PostgreSQL answered, whatever the checks say (a failing
    /// check is shown, not an error); 1 when PostgreSQL cannot be read; 2 for a
    /// configuration error.
    Status {
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Follow the outbox and keep the read models current (the main job).
    Run(run::RunArgs),
    /// Print the read models (users, activities, dead letters) for a person to read.
    Show(show::ShowArgs),
    /// Decode one Kafka message (Debezium or Outbox Event Router) and print it as JSON.
    Decode(decode::DecodeArgs),
    /// Publish the outbox to Kafka in Debezium's message format (no Kafka Connect needed).
    Relay(kafka::RelayArgs),
    /// Kafka administration: `kafka topics create [--partitions N] [TOPIC...]`.
    Kafka(kafka::KafkaArgs),
    /// Dead letters: `list`, `show ID`, `retry (ID... | --all)`, `discard ... --reason TEXT`, `export`.
    DeadLetters(dead_letters::DeadLettersArgs),
    /// Delete `processed` outbox rows older than `--older-than` (never unfinished or failed ones).
    Prune(prune::PruneArgs),
    /// Build the read models anew from the outbox into shadow collections and swap
    /// them in with no downtime (the live processor pauses at a batch boundary for
    /// the swap); `--dry-run` builds and compares with the live models, swaps nothing.
    ///
    /// Exit status: 0 once swapped (or compared); 1 on failure or while another
    /// rebuild runs; 130 when interrupted before the swap (nothing changed).
    Rebuild(rebuild::RebuildArgs),
    /// Fold the whole outbox and compare the read models with it, document by document;
    /// print each mismatch (collection, id, field, expected, found).
    ///
    /// Exit status: 0 with no mismatch; 1 with any, or when PostgreSQL or MongoDB
    /// cannot be read; 2 for a usage or configuration error.
    Verify(verify::VerifyArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(generate::CompletionsArgs),
    /// Print the manual page, or write one per command with `--out DIR`.
    Man(generate::ManArgs),
}

/// `--stats-file`, on `run` and `relay`.
#[derive(Args, Debug, Default, Clone)]
pub struct StatsFileArgs {
    /// Keep this JSON file current (every 250 ms and at exit) with the
    /// counters, throughput, CPU time, peak RSS and the distribution of
    /// commit-to-durable latencies (README "Stats file").
    #[arg(long, value_name = "PATH")]
    pub stats_file: Option<PathBuf>,
}

/// Runs `job`, keeping the stats file current if one is asked for.
async fn with_stats_file<T, F, Fut>(
    args: &StatsFileArgs,
    stats: Arc<Stats>,
    job: F,
) -> anyhow::Result<T>
where
    F: FnOnce(Option<Arc<StatsFile>>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let Some(path) = &args.stats_file else {
        return job(None).await;
    };
    let file = StatsFile::new(path.clone(), stats);
    let (result, written) = file.around(job(Some(file.clone()))).await;
    written.map_err(|e| anyhow::anyhow!("cannot write the stats file {}: {e}", path.display()))?;
    result
}

/// Runs the parsed command line; the binary's whole body.
pub fn main(cli: Cli) -> ExitCode {
    if let Command::Decode(args) = &cli.command {
        let mut stdout = std::io::stdout().lock();
        let mut stderr = std::io::stderr().lock();
        return decode::execute(args, &mut stdout, &mut stderr).unwrap_or_else(|err| {
            eprintln!("error: {err:#}");
            ExitCode::from(EXIT_FAILURE)
        });
    }
    if let Command::Completions(_) | Command::Man(_) = &cli.command {
        return generate::execute(&cli.command);
    }
    let extra = match &cli.command {
        Command::Run(args) => args.flags.values.as_slice(),
        Command::Relay(args) => args.flags.values.as_slice(),
        _ => &[],
    };
    // The settings the command line gave, to name them as the user typed them.
    let given: Vec<(Flag, String)> = cli
        .global
        .flags
        .values
        .iter()
        .chain(extra)
        .cloned()
        .collect();
    let config = match load_config(&cli.global, extra) {
        Ok(config) => config,
        Err(err) => {
            match &err {
                ConfigError::Invalid(problems) if problems.len() == 1 => {
                    eprintln!("invalid configuration: {err}");
                }
                ConfigError::Invalid(problems) => {
                    eprintln!("invalid configuration ({} problems):", problems.len());
                    for line in err.to_string().lines() {
                        eprintln!("  {line}");
                    }
                }
                ConfigError::EnvFileRead { .. } => {
                    let what = match &cli.global.env_file {
                        Some(_) => "give --env-file a readable file",
                        None => "make ./.env readable, or name another file with --env-file",
                    };
                    eprintln!("invalid configuration: {}; {what}", Chain(&err));
                }
                ConfigError::EnvFileLine { .. } => {
                    eprintln!("invalid configuration: {}", Chain(&err));
                }
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    crate::telemetry::init_logging(&config.log_level, config.log_format, config.secrets());
    // Errors come from drivers and libraries too: clear them of every secret.
    let scrubber = config.clone();
    // One thread: the work is I/O-bound, and a second thread only adds
    // cross-thread wake-ups (measured: 1.5x the CPU per captured event of
    // one thread, at no gain in events/s).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(dispatch(cli.command, config)) {
        Ok(code) => code,
        Err(err) => {
            // The drivers' own accounts, in full, for LOG_LEVEL=debug.
            if tracing::enabled!(tracing::Level::DEBUG) {
                // The outermost by its message (its debug form adds a backtrace), each
                // cause by its debug form (a driver error's, unsummarised).
                let causes: Vec<String> = std::iter::once(err.to_string())
                    .chain(err.chain().skip(1).map(|cause| format!("{cause:?}")))
                    .collect();
                tracing::debug!(causes = %scrubber.scrub(&causes.join(" <- ")), "failed");
            }
            let message = scrubber.scrub(&format!("{err:#}"));
            eprintln!("error: {}", hints::with_hint(&message, &given));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Environment, `.env` and flags (the global ones and the command's own,
/// `extra`), validated.
pub fn load_config(global: &GlobalArgs, extra: &[(Flag, String)]) -> Result<Config, ConfigError> {
    let env: EnvMap = config::env_map(global.env_file.as_deref())?;
    let flags: Vec<(Flag, String)> = global.flags.values.iter().chain(extra).cloned().collect();
    Config::load(&env, &flags)
}

async fn dispatch(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate => {
            let mut client = outbox::connect(&config.postgres).await?;
            let report = outbox::migrate::apply(&mut client, outbox::migrate::MIGRATIONS)
                .await
                .map_err(outbox::OutboxError::from)?;
            println!(
                "migrations: {} applied, {} already in place (schema version {})",
                report.applied.len(),
                report.already.len(),
                report
                    .applied
                    .iter()
                    .chain(&report.already)
                    .max()
                    .copied()
                    .unwrap_or(0)
            );
        }
        Command::Seed => {
            let mut client = outbox::connect(&config.postgres).await?;
            let inserted = outbox::seed::seed(&mut client).await?;
            println!(
                "seed: {inserted} events inserted, {} already present",
                outbox::seed::events().len() as u64 - inserted
            );
        }
        Command::Status { json } => {
            let status = status::read(&config).await?;
            if json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                print!("{}", status.render());
            }
        }
        Command::Run(args) => {
            let process = observing::Process::Run {
                project: args.sink != "discard",
            };
            let Some(mut observing) = observed(&config, process).await else {
                return Ok(ExitCode::from(EXIT_CONFIG));
            };
            observing.sample(
                &config,
                observing::Capture::of_run(&config),
                args.sink != "discard",
                config.source == config::SourceKind::Kafka,
            );
            observing.heartbeat(&config, observing::Capture::of_run(&config));
            let timeout = config.pipeline.shutdown_timeout;
            let after = config.clone();
            let code = until_signalled(timeout, |shutdown| {
                run::run(config, &args, shutdown, &observing)
            })
            .await;
            observing.stop().await;
            let code = code?;
            if code == ExitCode::from(130) {
                run::release_after_hard_stop(&after).await;
            }
            return Ok(code);
        }
        Command::Relay(args) => {
            let Some(mut observing) = observed(&config, observing::Process::Relay).await else {
                return Ok(ExitCode::from(EXIT_CONFIG));
            };
            let capture = match config.kafka.relay.source {
                config::RelaySource::Replication => observing::Capture::Replication {
                    slot: &config.kafka.relay.slot,
                },
                config::RelaySource::Polling => observing::Capture::Polling,
            };
            observing.sample(&config, capture, false, true);
            observing.heartbeat(&config, capture);
            let timeout = config.pipeline.shutdown_timeout;
            let code = until_signalled(timeout, |shutdown| {
                kafka::relay(config, &args, shutdown, &observing)
            })
            .await;
            observing.stop().await;
            return code;
        }
        Command::Kafka(args) => kafka::execute(&config, &args).await?,
        Command::DeadLetters(args) => return dead_letters::execute(&config, args).await,
        Command::Prune(args) => return prune::execute(&config, &args).await,
        Command::Rebuild(args) => return rebuild::execute(&config, &args).await,
        Command::Verify(args) => return verify::execute(&config, &args).await,
        Command::Show(args) => {
            let store = crate::store::mongo::MongoStore::connect(
                config.mongodb.uri.expose(),
                &config.mongodb.database,
            )
            .await
            .map_err(|e| {
                anyhow::Error::new(e).context(format!(
                    "cannot reach MongoDB at {}",
                    crate::store::mongo::redact_uri(config.mongodb.uri.expose())
                ))
            })?;
            print!("{}", show::render(&store, args.limit).await?);
        }
        Command::Decode(_) | Command::Completions(_) | Command::Man(_) => unreachable_decode(),
    }
    Ok(ExitCode::SUCCESS)
}

/// The metrics server of `run` and `relay`; `None` (said on stderr) when it
/// cannot listen where `METRICS_ADDR` says, a problem of configuration.
async fn observed(config: &Config, process: observing::Process) -> Option<observing::Observing> {
    match observing::Observing::start(config, process).await {
        Ok(observing) => Some(observing),
        Err(err) => {
            eprintln!("invalid configuration: {}", Chain(&err));
            None
        }
    }
}

/// Runs a long job: the first SIGINT/SIGTERM cancels its token (it finishes
/// the batch in flight and returns), a second one or the timeout abandons it
/// with status 130 (safe: nothing is acknowledged before it is durable).
async fn until_signalled<F, Fut>(timeout: std::time::Duration, job: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let shutdown = tokio_util::sync::CancellationToken::new();
    let hard = tokio_util::sync::CancellationToken::new();
    run::watch_signals(shutdown.clone(), hard.clone(), timeout);
    tokio::select! {
        result = job(shutdown) => result.map(|()| ExitCode::SUCCESS),
        _ = hard.cancelled() => Ok(ExitCode::from(130)),
    }
}

/// Counts of the read models and the highest applied `sequence_id`.
async fn read_model_status(
    config: &Config,
) -> Result<outbox::status::ReadModelStatus, crate::store::mongo::StoreError> {
    use crate::store::mongo::{MongoStore, ACTIVITIES, DEAD_LETTERS, USERS};
    let store = MongoStore::connect_within(
        config.mongodb.uri.expose(),
        &config.mongodb.database,
        Some(std::time::Duration::from_secs(3)),
    )
    .await?;
    let mut last = None;
    for collection in [USERS, ACTIVITIES] {
        let top = store.max_field(collection, "_seq").await?;
        last = last.max(top);
    }
    Ok(outbox::status::ReadModelStatus {
        users: store.count(USERS).await?,
        activities: store.count(ACTIVITIES).await?,
        dead_letters: store.count(DEAD_LETTERS).await?,
        last_applied_sequence_id: last,
    })
}

/// `decode`, `completions` and `man` need no configuration and return
/// before the runtime starts.
fn unreachable_decode() {
    tracing::error!("decode, completions and man are handled before configuration is loaded");
}
