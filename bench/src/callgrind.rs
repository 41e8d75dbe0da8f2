//! Instructions counted by valgrind's callgrind: a figure that does not move
//! with the machine's load, beside the CPU times that do. Each run keeps its
//! profile (`callgrind.<name>.out`, for `callgrind_annotate`) and log in the
//! results' `-logs` folder.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// valgrind on `PATH`, if installed (`scripts/setup.sh --bench` installs it).
pub fn valgrind() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("valgrind"))
        .find(|candidate| candidate.is_file())
}

/// The command words that run a program under callgrind, profile and log
/// named after `name` in `dir`.
pub fn wrapper(valgrind: &Path, dir: &Path, name: &str) -> Vec<String> {
    vec![
        valgrind.display().to_string(),
        "--tool=callgrind".to_string(),
        format!(
            "--callgrind-out-file={}",
            dir.join(format!("callgrind.{name}.out")).display()
        ),
        format!("--log-file={}", log(dir, name).display()),
    ]
}

/// A command that runs `program`, by `wrapper` (a program and its first
/// arguments, such as [`wrapper`]'s) when it is not empty.
pub fn command(wrapper: &[String], program: &Path) -> tokio::process::Command {
    match wrapper.split_first() {
        Some((runner, first)) => {
            let mut command = tokio::process::Command::new(runner);
            command.args(first).arg(program);
            command
        }
        None => tokio::process::Command::new(program),
    }
}

/// The instructions the run named `name` executed, all threads together.
pub fn collected(dir: &Path, name: &str) -> Result<u64> {
    let path = log(dir, name);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read callgrind's log {}", path.display()))?;
    parse_collected(&text).with_context(|| {
        format!(
            "callgrind's log {} has no `Collected :` line; did the program finish?",
            path.display()
        )
    })
}

fn log(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("callgrind.{name}.log"))
}

fn parse_collected(text: &str) -> Result<u64> {
    for line in text.lines() {
        if let Some((_, count)) = line.split_once("Collected :") {
            return count
                .trim()
                .parse()
                .with_context(|| format!("not a count: {line}"));
        }
    }
    bail!("no `Collected :` line")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_is_read_from_the_log() {
        let log = "==19281== Callgrind, a call-graph generating cache profiler\n\
                   ==19281== Events    : Ir\n==19281== Collected : 13042198\n==19281==\n";
        assert_eq!(parse_collected(log).ok(), Some(13_042_198));
        assert!(parse_collected("==1== Events    : Ir\n").is_err());
        assert!(parse_collected("==1== Collected : many\n").is_err());
    }
}
