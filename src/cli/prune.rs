//! `prune --older-than DURATION`: retention of the outbox (README,
//! "Retention").

use crate::config::Config;
use crate::outbox::{self, prune};
use clap::Args;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Delete `processed` rows created longer ago than this (e.g. 30d, 12h,
    /// 90m); unfinished and dead-lettered rows are always kept.
    #[arg(long, value_name = "DURATION", value_parser = parse_age)]
    pub older_than: Duration,
    /// Most rows deleted per statement (each its own short transaction).
    #[arg(long, value_name = "N", default_value_t = prune::BATCH,
          value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub batch_size: i64,
}

/// An age: `30d`, `2w`, or what configuration durations take (`12h`,
/// `90m`, `10s`, `250ms`; a bare number is seconds).
pub fn parse_age(raw: &str) -> Result<Duration, String> {
    let trimmed = raw.trim();
    let unit = |suffix: char, seconds: u64| -> Option<Duration> {
        let digits = trimmed.strip_suffix(suffix)?;
        let amount: u64 = digits.trim().parse().ok()?;
        amount.checked_mul(seconds).map(Duration::from_secs)
    };
    unit('d', 86_400)
        .or_else(|| unit('w', 7 * 86_400))
        .or_else(|| crate::config::parse_duration(trimmed))
        .ok_or_else(|| format!("`{raw}` is not a duration (use e.g. 30d, 2w, 12h, 90m, 10s)"))
}

/// Runs the prune and prints what it did; Ctrl-C stops between batches.
pub async fn execute(config: &Config, args: &PruneArgs) -> anyhow::Result<ExitCode> {
    let client = outbox::connect(&config.postgres).await?;
    let cutoff = prune::cutoff(&client, args.older_than).await?;
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stopper.cancel();
        }
    });
    let started = std::time::Instant::now();
    let mut last_said = started;
    let mut progress = |deleted: u64| {
        if last_said.elapsed() >= Duration::from_secs(2) {
            last_said = std::time::Instant::now();
            eprintln!("prune: {deleted} rows deleted so far");
        }
    };
    let pruned = prune::prune(&client, cutoff, args.batch_size, &stop, &mut progress).await?;
    let (unfinished, failed) = prune::kept(&client).await?;
    println!(
        "prune: deleted {} processed rows created before {} ({} batches, {:.1}s); kept {} unfinished and {} failed rows",
        pruned.deleted,
        crate::dead_letter::records::rfc3339(&pruned.cutoff),
        pruned.batches,
        started.elapsed().as_secs_f64(),
        unfinished,
        failed
    );
    if pruned.interrupted {
        eprintln!("prune: interrupted; run it again to go on");
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_take_days_weeks_and_the_configuration_units() {
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_age(" 90m "), Ok(Duration::from_secs(90 * 60)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "d",
            "-1d",
            "3 days",
            "1.5d",
            "soon",
            "99999999999999999999d",
        ] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }
}
