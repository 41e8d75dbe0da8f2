//! `event-processor` started by the benchmark as a child process (so its CPU
//! time and peak RSS are its own), watched through its `--stats-file`.

use crate::scrape::{free_loopback_addr, metrics_text};
use activity_event_processor::stats_file::StatsReport;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Child {
    name: String,
    process: tokio::process::Child,
    report: PathBuf,
    log: PathBuf,
    /// Where it serves `/metrics`; `None` when `env` turned it off.
    metrics_addr: Option<SocketAddr>,
}

impl Child {
    /// Starts `event-processor <args> --stats-file <dir>/<name>.json` with
    /// `env` added; its stderr goes to `<dir>/<name>.log`. It serves
    /// `/metrics` on a free loopback port unless `env` sets `METRICS_ADDR`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str], env: &[(&str, String)]) -> Result<Child> {
        Self::spawn_under(dir, name, &[], args, env)
    }

    /// [`Child::spawn`], run by `wrapper` (a program and its first arguments,
    /// such as callgrind's) when it is not empty.
    pub fn spawn_under(
        dir: &Path,
        name: &str,
        wrapper: &[String],
        args: &[&str],
        env: &[(&str, String)],
    ) -> Result<Child> {
        let exe = processor_binary()?;
        let report = dir.join(format!("{name}.json"));
        let log = dir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&report);
        let stderr = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        // Several processes may run at once: each takes a free port.
        let metrics_addr = match env.iter().find(|(key, _)| *key == "METRICS_ADDR") {
            Some((_, value)) => value.parse().ok(),
            None => Some(free_loopback_addr()?),
        };
        let mut command = crate::callgrind::command(wrapper, &exe);
        command
            .args(args)
            .arg("--stats-file")
            .arg(&report)
            .envs(metrics_addr.map(|addr| ("METRICS_ADDR", addr.to_string())))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("LOG_FORMAT", "text")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        let process = command
            .spawn()
            .with_context(|| format!("cannot start `event-processor {}`", args.join(" ")))?;
        Ok(Child {
            name: name.to_string(),
            process,
            report,
            log,
            metrics_addr,
        })
    }

    /// Its `/metrics` now.
    pub async fn metrics(&self) -> Result<String> {
        let addr = self
            .metrics_addr
            .with_context(|| format!("{} serves no /metrics", self.name))?;
        metrics_text(addr)
            .await
            .with_context(|| format!("cannot read {}'s /metrics", self.name))
    }

    /// The latest report, if one was written.
    pub fn report(&self) -> Option<StatsReport> {
        let bytes = std::fs::read(&self.report).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn failure(&self, what: &str) -> anyhow::Error {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::anyhow!(
            "{} {what}; its log ({}) ends with:\n{}",
            self.name,
            self.log.display(),
            tail.join("\n")
        )
    }

    /// Waits until the child has handled `expected` distinct events (events
    /// delivered again after a reconnect do not count); `progress(done)` is
    /// called every 250 ms. Fails if the child exits first or `timeout` passes.
    pub async fn wait_done(
        &mut self,
        expected: u64,
        timeout: Duration,
        mut progress: impl FnMut(u64),
    ) -> Result<StatsReport> {
        let started = Instant::now();
        loop {
            if let Some(report) = self.report() {
                let distinct = report.done.saturating_sub(report.duplicates);
                progress(distinct);
                if distinct >= expected {
                    return Ok(report);
                }
            }
            if let Ok(Some(status)) = self.process.try_wait() {
                return Err(self.failure(&format!("exited ({status}) before finishing")));
            }
            if started.elapsed() > timeout {
                return Err(self.failure(&format!(
                    "did not handle {expected} events within {}s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits for the child to exit by itself (`--until-caught-up`).
    pub async fn wait_exit(
        mut self,
        timeout: Duration,
        mut progress: impl FnMut(u64),
    ) -> Result<StatsReport> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.process.try_wait() {
                if !status.success() {
                    return Err(self.failure(&format!("failed ({status})")));
                }
                return self.final_report();
            }
            if let Some(report) = self.report() {
                progress(report.done);
            }
            if started.elapsed() > timeout {
                return Err(self.failure(&format!("did not finish within {}s", timeout.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, wait for a graceful exit, return the final report.
    pub async fn stop(mut self) -> Result<StatsReport> {
        if let Some(pid) = self.process.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(60), self.process.wait()).await {
            Ok(Ok(status)) if status.success() => self.final_report(),
            Ok(Ok(status)) => Err(self.failure(&format!("failed on SIGTERM ({status})"))),
            Ok(Err(err)) => Err(err.into()),
            Err(_) => {
                let _ = self.process.start_kill();
                Err(self.failure("did not stop within 60 s of SIGTERM"))
            }
        }
    }

    fn final_report(&self) -> Result<StatsReport> {
        match self.report() {
            Some(report) if report.finished => Ok(report),
            _ => Err(self.failure("exited without its final report")),
        }
    }
}

/// The `event-processor` binary: `EVENT_PROCESSOR_BIN` if set, else the one
/// beside this binary (cargo builds both into the same target folder).
fn processor_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("EVENT_PROCESSOR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("cannot find this binary's folder")?;
    let path = me.with_file_name("event-processor");
    if !path.is_file() {
        anyhow::bail!(
            "{} not found: build it (`cargo build --release --workspace`) or set EVENT_PROCESSOR_BIN",
            path.display()
        );
    }
    Ok(path)
}

/// CPU seconds of the children this process has waited for (user + system),
/// from `/proc/self/stat`.
pub fn children_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // cutime and cstime are fields 16 and 17 of the whole line, i.e.
    // indexes 13 and 14 after "state".
    let tick = |i: usize| -> Option<f64> { fields.get(i)?.parse::<f64>().ok() };
    let hz = 100.0; // USER_HZ is 100 on every Linux ABI.
    Some((tick(13)? + tick(14)?) / hz)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_cpu_of_its_children() {
        let before = super::children_cpu_seconds().expect("cpu");
        let status = std::process::Command::new("true").status().expect("true");
        assert!(status.success());
        assert!(super::children_cpu_seconds().expect("cpu") >= before);
    }
}
