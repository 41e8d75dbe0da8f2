//! `verify [--aggregate ID] [--limit N]`: the read models against a fold of
//! the outbox (README, "Verify").

use crate::config::Config;
use crate::outbox;
use crate::store::mongo::{redact_uri, MongoStore};
use crate::verify::{self, Mismatch, Progress, Scope, Summary};
use clap::Args;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Longest wait for MongoDB to answer before verify gives up.
const MONGO_WAIT: Duration = Duration::from_secs(5);
/// Pause between two progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// A user's or an activity's id, a UUID.
fn aggregate_id(raw: &str) -> Result<Uuid, String> {
    raw.trim().parse().map_err(|_| {
        format!("`{raw}` is not an aggregate id: give a user's or an activity's id (a UUID, as `event-processor show` prints them)")
    })
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Only this aggregate (a user or an activity id): its document, the
    /// documents that copy it, and its dead letters.
    #[arg(long, value_name = "ID", value_parser = aggregate_id)]
    pub aggregate: Option<Uuid>,
    /// Print at most N mismatches (all are still counted).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
}

/// Runs the verification; exit 0 with no mismatch, 1 with any.
pub async fn execute(config: &Config, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let client = outbox::connect(&config.postgres).await?;
    let store = connect_mongo(config).await?;
    let scope = args.aggregate.map_or(Scope::All, Scope::Aggregate);
    let started = Instant::now();
    let mut progress = Reporter::new(started);
    let stdout = &mut std::io::stdout().lock();
    let (mut count, mut shown) = (0u64, 0u64);
    let mut print = |mismatch: Mismatch| {
        count += 1;
        if args.limit.is_none_or(|limit| shown < limit) {
            shown += 1;
            let _ = writeln!(stdout, "{mismatch}");
        }
    };
    let summary =
        verify::verify(&client, &store, scope, &mut |p| progress.say(p), &mut print).await?;
    stdout.flush()?;
    if let (Some(id), Some(0), 0, 0) = (
        args.aggregate,
        summary.aggregate_rows,
        summary.documents,
        count,
    ) {
        eprintln!("error: no outbox row and no read-model document has aggregate {id}");
        return Ok(ExitCode::from(super::EXIT_FAILURE));
    }
    say_summary(&summary, count, shown, started.elapsed());
    Ok(if count == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}

/// MongoDB, asked first so that a long fold is not wasted on it.
async fn connect_mongo(config: &Config) -> anyhow::Result<MongoStore> {
    let uri = config.mongodb.uri.expose();
    MongoStore::connect_within(uri, &config.mongodb.database, Some(MONGO_WAIT))
        .await
        .map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot reach MongoDB at {}", redact_uri(uri)))
        })
}

fn say_summary(summary: &Summary, count: u64, shown: u64, took: Duration) {
    let outcome = match count {
        0 => "no mismatches".to_string(),
        n if n == shown => format!("{n} mismatches"),
        n => format!("{n} mismatches ({shown} shown)"),
    };
    let peak = crate::stats_file::peak_rss_bytes().map_or("-".into(), |b| {
        format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
    });
    eprintln!(
        "verify: {outcome}; {} outbox rows folded ({} malformed), {} documents compared, \
         {:.1}s, peak RSS {peak}",
        summary.rows,
        summary.malformed,
        summary.documents,
        took.as_secs_f64()
    );
    if summary.unfinished > 0 {
        eprintln!(
            "verify: {} outbox rows are not finished (pending, processing or retry): their \
             effects may still be on the way; verify again once the processor has caught up",
            summary.unfinished
        );
    }
}

/// Progress on stderr, at most every [`PROGRESS_EVERY`].
struct Reporter {
    started: Instant,
    last: Instant,
}

impl Reporter {
    fn new(started: Instant) -> Reporter {
        Reporter {
            started,
            last: started,
        }
    }

    fn say(&mut self, progress: Progress) {
        if self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        match progress {
            Progress::Folded(rows) => eprintln!(
                "verify: {rows} outbox rows folded ({:.0} rows/s)",
                rows as f64 / seconds
            ),
            Progress::Compared(documents) => {
                eprintln!("verify: {documents} documents compared")
            }
        }
    }
}
