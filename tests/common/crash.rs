//! Processes with a crash point armed (`FAILPOINTS`, the `failpoints`
//! feature): start one, and check that it died by the abort at that point.

use super::kafka::Proc;
use super::pipeline::binary;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

const SIGABRT: i32 = 6;

/// Starts the binary with `args` and `env` on a clean environment, its log
/// appended to `log`, with core dumps off (an abort would leave one).
pub fn spawn(args: &[&str], env: &[(&'static str, String)], log: &Path) -> Proc {
    let mut command = Command::new("sh");
    command
        .args(["-c", "ulimit -c 0; exec \"$0\" \"$@\"", &binary()])
        .args(args);
    super::kafka::spawn_command(command, env, log)
}

/// `env` with `point` armed to abort at pass `passes + 1`, and the log at
/// `info` (what the process did before it crashed is worth reading).
pub fn armed(
    env: &[(&'static str, String)],
    point: &str,
    passes: u32,
) -> Vec<(&'static str, String)> {
    let mut env = env.to_vec();
    env.push(("FAILPOINTS", format!("{point}={passes}*off->return")));
    env.push(("LOG_LEVEL", "info".into()));
    env
}

/// The exit status, or `None` if it still runs after `limit`.
pub async fn wait_exit(child: &mut Proc, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            return Some(status);
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the armed process to abort at `point` (SIGABRT, and its log
/// names the point); otherwise says what happened instead.
pub async fn aborted_at(
    child: &mut Proc,
    point: &str,
    log: &Path,
    limit: Duration,
) -> Result<(), String> {
    let status = wait_exit(child, limit).await;
    let said = std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(&format!("crash point `{point}` reached"));
    match status {
        Some(status) if status.signal() == Some(SIGABRT) && said => Ok(()),
        Some(status) => Err(format!(
            "exited with {status} instead of aborting at {point}"
        )),
        None => Err(format!("did not reach {point} within {limit:?}")),
    }
}

/// `run --until-caught-up <args>` (no crash point), which must exit 0.
pub async fn run_until_caught_up(
    args: &[&str],
    env: &[(&'static str, String)],
    log: &Path,
    limit: Duration,
) {
    let mut all = vec!["run", "--until-caught-up"];
    all.extend_from_slice(args);
    let mut child = spawn(&all, env, log);
    let status = wait_exit(&mut child, limit).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{all:?} without crash points: {status:?}\n{}",
        super::kafka::tail(log)
    );
}
