//! `rebuild [--dry-run]`: the read models built anew from the outbox and
//! swapped in with no downtime (README, "Rebuild").

use crate::config::Config;
use crate::outbox;
use crate::rebuild::{self, Comparison, Options, Outcome, RebuildError, Step};
use crate::store::mongo::{redact_uri, MongoStore};
use clap::Args;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest wait for MongoDB to answer before rebuild gives up.
const MONGO_WAIT: Duration = Duration::from_secs(5);
/// Pause between two progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(Args, Debug)]
pub struct RebuildArgs {
    /// Build the shadow collections and compare them with the live read
    /// models; swap nothing (the shadow is dropped afterwards).
    #[arg(long)]
    pub dry_run: bool,
    /// Events per batch written to the shadow collections.
    #[arg(long, value_name = "N", default_value_t = 2_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// With `--dry-run`: print at most N differences (all are counted).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub limit: usize,
}

/// Runs the rebuild; exit 0 once swapped (or compared, with `--dry-run`).
pub async fn execute(config: &Config, args: &RebuildArgs) -> anyhow::Result<ExitCode> {
    let client = outbox::connect(&config.postgres).await?;
    let uri = config.mongodb.uri.expose();
    let store = MongoStore::connect_within(uri, &config.mongodb.database, Some(MONGO_WAIT))
        .await
        .map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot reach MongoDB at {}", redact_uri(uri)))
        })?
        .with_read_chunk(config.mongodb.read_chunk);
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("rebuild: stopping (the live read models stay as they are)");
            stopper.cancel();
        }
    });
    let options = Options {
        dry_run: args.dry_run,
        batch_size: args.batch_size as usize,
        show: args.limit,
    };
    let started = Instant::now();
    let mut reporter = Reporter::new(started);
    let result = rebuild::rebuild(&client, &store, &options, &stop, &mut |s| reporter.say(s)).await;
    match result {
        Ok(outcome) => {
            say_outcome(&outcome, args.dry_run, started.elapsed());
            Ok(ExitCode::SUCCESS)
        }
        Err(RebuildError::Busy(what)) => {
            eprintln!("error: {what}");
            Ok(ExitCode::from(super::EXIT_FAILURE))
        }
        Err(RebuildError::Interrupted) => {
            eprintln!("rebuild: interrupted before the swap; the live read models are unchanged and the shadow collections were dropped");
            Ok(ExitCode::from(130))
        }
        Err(err) => {
            Err(anyhow::Error::new(err).context("rebuild failed (the next rebuild starts over)"))
        }
    }
}

fn say_outcome(outcome: &Outcome, dry_run: bool, took: Duration) {
    eprintln!(
        "rebuild: {} outbox rows read ({} malformed), {} events applied, {} more caught up, {:.1}s",
        outcome.rows,
        outcome.malformed,
        outcome.applied,
        outcome.caught_up,
        took.as_secs_f64()
    );
    match &outcome.comparison {
        Some(comparison) => say_comparison(comparison, outcome),
        None if !dry_run => println!(
            "rebuild: swapped in {}; the writers were paused for {} ms",
            documents(outcome),
            outcome.paused.as_millis()
        ),
        None => {}
    }
}

fn say_comparison(c: &Comparison, outcome: &Outcome) {
    for (collection, id, d) in &c.shown {
        let value = |v: &Option<serde_json::Value>| {
            v.as_ref()
                .map_or("absent".into(), serde_json::Value::to_string)
        };
        println!(
            "{collection} {id} {}: the rebuild has {}, the live model {}",
            d.field,
            value(&d.expected),
            value(&d.found)
        );
    }
    for (collection, id, side) in &c.alone {
        println!("{collection} {id}: only in the {side} collection");
    }
    println!(
        "rebuild --dry-run: {} of {} documents would change, {} exist only live, {} only in the rebuild, {} differ at different positions (the live processor is behind or ahead); built {}, nothing swapped",
        c.differing,
        c.compared,
        c.only_live,
        c.only_shadow,
        c.elsewhere,
        documents(outcome)
    );
}

/// `1 user and 2 activities`.
fn documents(outcome: &Outcome) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "{} and {}",
        plural(outcome.users, "user", "users"),
        plural(outcome.activities, "activity", "activities")
    )
}

/// Progress on stderr, at most every [`PROGRESS_EVERY`], with rate and ETA.
struct Reporter {
    started: Instant,
    last: Option<Instant>,
}

impl Reporter {
    fn new(started: Instant) -> Reporter {
        Reporter {
            started,
            last: None,
        }
    }

    fn say(&mut self, step: Step) {
        match step {
            Step::TookOver(stale) => eprintln!(
                "rebuild: a previous rebuild (started {}) stopped while {}; its shadow collections are discarded and the rebuild starts over",
                stale.started_at, stale.state
            ),
            Step::Building { done, total } => {
                let due = self.last.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY);
                if !due && done < total {
                    return;
                }
                self.last = Some(Instant::now());
                let seconds = self.started.elapsed().as_secs_f64().max(0.001);
                let rate = done as f64 / seconds;
                let percent = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
                let eta = if rate > 0.0 && total > done {
                    format!(", about {:.0}s left", (total - done) as f64 / rate)
                } else {
                    String::new()
                };
                eprintln!(
                    "rebuild: building {} {done}/{total} rows ({percent:.0}%, {rate:.0} rows/s{eta})",
                    bar(percent)
                );
            }
            Step::CaughtUp { pass, events } => {
                let pass = pass.map_or("last catch-up pass (writers paused)".into(), |n| format!("catch-up pass {n}"));
                eprintln!("rebuild: {pass}: {events} events applied that the snapshot did not hold")
            }
            Step::Paused { gone } => {
                eprintln!("rebuild: writers paused at a batch boundary");
                for writer in gone {
                    eprintln!("rebuild: writer {writer} has not answered for 10 s; taken as stopped");
                }
            }
            Step::Swapped { collection } => eprintln!("rebuild: swapped {collection}"),
        }
    }
}

/// `[=====     ]` for a percentage.
fn bar(percent: f64) -> String {
    let filled = ((percent / 5.0).round() as usize).min(20);
    format!("[{}{}]", "=".repeat(filled), " ".repeat(20 - filled))
}
