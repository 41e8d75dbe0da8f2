//! `event-processor completions SHELL` and `event-processor man`: shell
//! completion scripts and manual pages, generated from the command line
//! itself ([`super::examples::command`]), so they never drift from it.

use clap::{Args, ValueEnum};
use clap_complete::Shell;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// `completions`.
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: ShellArg,
}

/// The shells `completions` writes for.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShellArg {
    Bash,
    Zsh,
    Fish,
    Elvish,
    Powershell,
}

impl From<ShellArg> for Shell {
    fn from(shell: ShellArg) -> Shell {
        match shell {
            ShellArg::Bash => Shell::Bash,
            ShellArg::Zsh => Shell::Zsh,
            ShellArg::Fish => Shell::Fish,
            ShellArg::Elvish => Shell::Elvish,
            ShellArg::Powershell => Shell::PowerShell,
        }
    }
}

/// `man`.
#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write a page per command (`event-processor.1`, `event-processor-run.1`,
    /// ...) into this folder instead of printing the main page.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

const BIN: &str = "event-processor";

/// Prints the completion script for `args.shell` to `stdout`.
pub fn completions(args: &CompletionsArgs, stdout: &mut dyn Write) -> std::io::Result<()> {
    let mut command = super::examples::command();
    // Into memory first: the generator panics on a failed write.
    let mut script = Vec::new();
    clap_complete::generate(Shell::from(args.shell), &mut command, BIN, &mut script);
    if args.shell == ShellArg::Bash {
        // The bash generator spells the program's own name two ways when it
        // holds a `-` (`event__processor` where it walks the words typed,
        // `event__subcmd__processor` in the options of each subcommand), so
        // no subcommand's options would complete: one spelling for both.
        let text = String::from_utf8_lossy(&script)
            .replace("event__subcmd__processor", &BIN.replace('-', "__"));
        script = text.into_bytes();
    }
    stdout.write_all(&script)?;
    stdout.flush()
}

/// Prints the main manual page to `stdout`, or writes every page into
/// `args.out` (created if missing) and names each file written on `stdout`.
pub fn man(args: &ManArgs, stdout: &mut dyn Write) -> Result<(), String> {
    let command = super::examples::command();
    let Some(dir) = &args.out else {
        let mut page = Vec::new();
        return match clap_mangen::Man::new(command)
            .render(&mut page)
            .and_then(|()| stdout.write_all(&page))
            .and_then(|()| stdout.flush())
        {
            // A reader that stopped early (`| head`) is not a failure.
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            result => result.map_err(|err| format!("cannot write the manual page: {err}")),
        };
    };
    let cannot = |err: std::io::Error| {
        format!(
            "cannot write the manual pages into --out {}: {err}; give a folder you can write to",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(cannot)?;
    clap_mangen::generate_to(command, dir).map_err(cannot)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(cannot)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.extension().is_some_and(|x| x == "1")
                && path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(BIN))
        })
        .collect();
    pages.sort();
    for page in pages {
        writeln!(stdout, "{}", page.display()).map_err(cannot)?;
    }
    Ok(())
}

/// Runs `completions` or `man`: 0, or 1 with one line on stderr.
pub fn execute(command: &super::Command) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    let result = match command {
        super::Command::Completions(args) => match completions(args, &mut stdout) {
            // A reader that stopped early (`| head`) is not a failure.
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            result => result.map_err(|err| format!("cannot write the script: {err}")),
        },
        super::Command::Man(args) => man(args, &mut stdout),
        _ => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(super::EXIT_FAILURE)
        }
    }
}
