//! The progress line of a running process.

use crate::counters::Stats;
use crate::source::Source;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The progress line: a rewritten line on a terminal, a log line otherwise.
pub struct Progress {
    stats: Arc<Stats>,
    started: Instant,
    last: Instant,
    terminal: bool,
    printed: bool,
}

impl Progress {
    pub fn new(stats: Arc<Stats>) -> Progress {
        let now = Instant::now();
        Progress {
            stats,
            started: now,
            last: now,
            terminal: std::io::stderr().is_terminal(),
            printed: false,
        }
    }

    pub async fn tick<S: Source>(&mut self, source: &mut S) {
        let every = if self.terminal {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(10)
        };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let done = self.stats.done();
        if done == 0 && !self.printed {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / elapsed;
        let remaining = source.backlog().await.ok().and_then(|b| b.remaining);
        let eta = match remaining {
            Some(left) if rate > 0.0 => format!("{:.0}s", left as f64 / rate),
            _ => "-".into(),
        };
        let left = remaining.map_or("?".into(), |r| r.to_string());
        if self.terminal {
            eprint!("\r\x1b[2K{done} events done, {left} remaining, {rate:.0}/s, eta {eta}");
            self.printed = true;
        } else {
            tracing::info!(
                done,
                remaining = left.as_str(),
                rate = rate.round() as u64,
                eta = eta.as_str(),
                "progress"
            );
        }
    }

    pub fn finish(&self) {
        if self.printed {
            eprintln!();
        }
    }
}
