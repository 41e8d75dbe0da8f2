//! One run of the real binary: its environment, `.env` and `--env-file`, a
//! time limit, and what it must (exit status, what it says) and must not
//! (any secret) print.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every secret of these tests carries both markers: output holding either
/// one holds (part of) a secret.
pub const MARKERS: &[&str] = &["S3CR3T", "xyzzy"];
pub const PG_SECRET: &str = "S3CR3T-PG-xyzzy";
pub const MONGO_SECRET: &str = "S3CR3T-MONGO-xyzzy";
pub const KAFKA_SECRET: &str = "S3CR3T-KAFKA-xyzzy";
pub const CONSOLE_SECRET: &str = "S3CR3T-CONSOLE-xyzzy";

/// How the run must end.
#[derive(Debug, Clone, Copy)]
pub enum End {
    /// Exits by itself with this status.
    Exit(i32),
    /// Is still running (retrying) after this long, then stops with status 0
    /// on SIGTERM.
    RunsUntilStopped(Duration),
}

pub struct Case {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dotenv: Option<String>,
    env_file: Option<String>,
    end: End,
    says: Vec<String>,
    lines: Option<usize>,
    limit: Duration,
}

pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
}

impl Case {
    pub fn new(name: &str, args: &[&str]) -> Case {
        Case {
            name: name.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            dotenv: None,
            env_file: None,
            end: End::Exit(0),
            says: Vec::new(),
            lines: None,
            limit: Duration::from_secs(120),
        }
    }

    /// Adds (or replaces) variables of the environment.
    pub fn env<K: AsRef<str>, V: AsRef<str>>(mut self, pairs: &[(K, V)]) -> Case {
        for (key, value) in pairs {
            self.env.retain(|(k, _)| k != key.as_ref());
            self.env
                .push((key.as_ref().to_string(), value.as_ref().to_string()));
        }
        self
    }

    /// Writes `.env` into the working folder of the run.
    pub fn dotenv(mut self, text: &str) -> Case {
        self.dotenv = Some(text.to_string());
        self
    }

    /// Writes `text` to a file and passes it with `--env-file`.
    pub fn env_file(mut self, text: &str) -> Case {
        self.env_file = Some(text.to_string());
        self
    }

    pub fn ends(mut self, end: End) -> Case {
        self.end = end;
        self
    }

    /// Text that stdout or stderr must contain.
    pub fn says(mut self, text: &str) -> Case {
        self.says.push(text.to_string());
        self
    }

    /// The exact number of lines on stderr.
    pub fn stderr_lines(mut self, count: usize) -> Case {
        self.lines = Some(count);
        self
    }

    /// Runs the case and checks it; returns what it printed.
    pub fn check(self) -> Outcome {
        // Removed when the case ends, whatever its outcome.
        let folder = tempfile::Builder::new()
            .prefix("aep-secrets-")
            .tempdir()
            .expect("working folder");
        let dir = folder.path().to_path_buf();
        let mut args = self.args.clone();
        if let Some(text) = &self.dotenv {
            std::fs::write(dir.join(".env"), text).expect("write .env");
        }
        if let Some(text) = &self.env_file {
            let path = dir.join("secrets.env");
            std::fs::write(&path, text).expect("write env file");
            args.insert(0, path.display().to_string());
            args.insert(0, "--env-file".to_string());
        }
        let mut command = Command::new(crate::common::pipeline::binary());
        command.args(&args).env_clear().current_dir(&dir);
        for key in ["PATH", "HOME"] {
            if let Ok(value) = std::env::var(key) {
                command.env(key, value);
            }
        }
        // Tests run in parallel: the metrics server takes a free port.
        command.env("METRICS_ADDR", "127.0.0.1:0");
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let stdout_path = dir.join("stdout");
        let stderr_path = dir.join("stderr");
        let child = command
            .stdin(Stdio::null())
            .stdout(file(&stdout_path))
            .stderr(file(&stderr_path))
            .spawn()
            .expect("spawn event-processor");
        let mut child = Guard(child);
        let read = |path: &PathBuf| {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(path) {
                let _ = f.read_to_string(&mut text);
            }
            text
        };
        let mut ended_early = None;
        let code = match self.end {
            End::Exit(_) => wait(&mut child.0, self.limit),
            End::RunsUntilStopped(after) => match wait(&mut child.0, after) {
                Some(code) => {
                    ended_early = Some(code);
                    Some(code)
                }
                None => {
                    let _ = Command::new("kill")
                        .args(["-TERM", &child.0.id().to_string()])
                        .status();
                    wait(&mut child.0, self.limit)
                }
            },
        };
        let outcome = Outcome {
            stdout: read(&stdout_path),
            stderr: read(&stderr_path),
        };
        drop(folder);
        let context = format!(
            "{} (event-processor {})\n--- stdout\n{}\n--- stderr\n{}",
            self.name,
            args.join(" "),
            outcome.stdout,
            outcome.stderr
        );
        for marker in MARKERS {
            assert!(
                !outcome.stdout.contains(marker) && !outcome.stderr.contains(marker),
                "a secret was printed: {context}"
            );
        }
        if let Some(code) = ended_early {
            panic!("exited with {code} instead of retrying: {context}");
        }
        let Some(code) = code else {
            panic!("did not end within {:?}: {context}", self.limit);
        };
        let expected = match self.end {
            End::Exit(code) => code,
            End::RunsUntilStopped(_) => 0,
        };
        assert_eq!(code, expected, "exit status: {context}");
        for text in &self.says {
            assert!(
                outcome.stdout.contains(text) || outcome.stderr.contains(text),
                "does not say {text:?}: {context}"
            );
        }
        if let Some(lines) = self.lines {
            assert_eq!(outcome.stderr.lines().count(), lines, "{context}");
        }
        outcome
    }
}

fn file(path: &PathBuf) -> Stdio {
    Stdio::from(std::fs::File::create(path).expect("output file"))
}

/// The exit status within `limit` (`-1` for a signal), or `None`.
fn wait(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status.code().unwrap_or(-1));
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the child (SIGKILL) when dropped: nothing outlives its case.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}
