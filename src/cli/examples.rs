//! Every command's `--help` ends with examples: the command line built from
//! the derive definitions ([`super::Cli`]) with each command's examples laid
//! on top, so `--help`, the completions and the manual pages agree.

use super::Cli;
use clap::{ArgMatches, Command, CommandFactory, FromArgMatches};

/// The examples of each command, by its path (`""` is the program itself).
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "",
        "event-processor migrate && event-processor seed   # the schema and four seed events\n\
         event-processor run --until-caught-up             # apply every pending event, then exit\n\
         event-processor status                            # what the outbox and the read models hold",
    ),
    ("migrate", "event-processor migrate"),
    ("seed", "event-processor seed"),
    ("status", "event-processor status\nevent-processor status --json | jq .checks"),
    (
        "run",
        "event-processor run                                # follow the outbox until Ctrl-C\n\
         event-processor run --until-caught-up --source polling --workers 4\n\
         event-processor run --stats-file /var/tmp/processor.json",
    ),
    ("show", "event-processor show --limit 5"),
    (
        "decode",
        "event-processor decode message.json\n\
         event-processor decode --key key.json --topic outbox.event.User --header eventType=UserCreated value.json\n\
         kcat -C -b localhost:9092 -t activity.public.event_outbox -c 1 -e | event-processor decode -",
    ),
    (
        "relay",
        "event-processor relay --until-caught-up\n\
         event-processor relay --format outbox --topic activity.events",
    ),
    ("kafka", "event-processor kafka topics create --partitions 6"),
    ("kafka topics", "event-processor kafka topics create --partitions 6"),
    (
        "kafka topics create",
        "event-processor kafka topics create                        # KAFKA_TOPIC\n\
         event-processor kafka topics create --partitions 6 outbox.event.User",
    ),
    (
        "dead-letters",
        "event-processor dead-letters list\n\
         event-processor dead-letters retry --all --type UserCreated",
    ),
    (
        "dead-letters list",
        "event-processor dead-letters list --since 1h\n\
         event-processor dead-letters list --json --type ActivityCreated",
    ),
    (
        "dead-letters show",
        "event-processor dead-letters show 0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10",
    ),
    (
        "dead-letters retry",
        "event-processor dead-letters retry 0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10\n\
         event-processor dead-letters retry --all --error 'missing field' --wait 2m",
    ),
    (
        "dead-letters discard",
        "event-processor dead-letters discard --all --type TestEvent --reason 'test traffic'",
    ),
    (
        "dead-letters export",
        "event-processor dead-letters export > dead-letters.jsonl",
    ),
    (
        "prune",
        "event-processor prune --older-than 30d\n\
         event-processor prune --older-than 2w --batch-size 5000",
    ),
    (
        "verify",
        "event-processor verify\n\
         event-processor verify --aggregate 7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10 --limit 20",
    ),
    (
        "rebuild",
        "event-processor rebuild --dry-run\n\
         event-processor rebuild",
    ),
    (
        "completions",
        "event-processor completions bash > ~/.local/share/bash-completion/completions/event-processor\n\
         event-processor completions zsh > \"${fpath[1]}/_event-processor\"\n\
         event-processor completions fish > ~/.config/fish/completions/event-processor.fish",
    ),
    (
        "man",
        "event-processor man | man -l -\n\
         event-processor man --out ~/.local/share/man/man1",
    ),
];

/// The examples of the command at `path`, as `--help` shows them.
fn examples(path: &str) -> Option<String> {
    let (_, text) = EXAMPLES.iter().find(|(p, _)| *p == path)?;
    let title = if text.contains('\n') {
        "Examples:"
    } else {
        "Example:"
    };
    let lines: Vec<String> = text.lines().map(|line| format!("  {line}")).collect();
    Some(format!("{title}\n{}", lines.join("\n")))
}

/// The whole command line, each command with its examples.
pub fn command() -> Command {
    with_examples(Cli::command(), "")
}

fn with_examples(command: Command, path: &str) -> Command {
    let names: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .collect();
    let mut command = match examples(path) {
        Some(text) => command.after_help(text),
        None => command,
    };
    for name in names {
        let sub_path = if path.is_empty() {
            name.clone()
        } else {
            format!("{path} {name}")
        };
        command = command.mut_subcommand(&name, |sub| with_examples(sub, &sub_path));
    }
    command
}

/// Parses the process's arguments (exits with clap's message and status 2
/// on a usage error, 0 after `--help` or `--version`).
pub fn parse() -> Cli {
    let matches: ArgMatches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(command: &Command, path: &str, out: &mut Vec<String>) {
        out.push(path.to_string());
        for sub in command.get_subcommands() {
            let sub_path = if path.is_empty() {
                sub.get_name().to_string()
            } else {
                format!("{path} {}", sub.get_name())
            };
            paths(sub, &sub_path, out);
        }
    }

    #[test]
    fn every_command_has_examples_and_every_example_a_command() {
        let mut all = Vec::new();
        paths(&Cli::command(), "", &mut all);
        for path in &all {
            assert!(
                EXAMPLES.iter().any(|(p, _)| p == path),
                "`event-processor {path}` has no example: add one to EXAMPLES in src/cli/examples.rs"
            );
        }
        for (path, text) in EXAMPLES {
            assert!(all.iter().any(|p| p == path), "no command `{path}`");
            for line in text.lines() {
                assert!(
                    line.contains(&format!("event-processor {path}").trim_end().to_string()),
                    "an example of `{path}` runs another command: {line}"
                );
            }
        }
    }

    #[test]
    fn help_ends_with_the_examples() {
        let mut command = command();
        let help = command.render_long_help().to_string();
        assert!(
            help.trim_end().ends_with("event-processor status                            # what the outbox and the read models hold"),
            "{help}"
        );
        let mut command = super::command();
        let prune = command
            .find_subcommand_mut("prune")
            .map(|sub| sub.render_long_help().to_string())
            .unwrap_or_default();
        assert!(
            prune.contains("Examples:\n  event-processor prune --older-than 30d\n"),
            "{prune}"
        );
    }

    /// The words of the part of a shell line that runs this program: up to
    /// an unquoted `|`, `>`, `&` or `#`, quotes removed.
    fn program_words(line: &str) -> Vec<String> {
        let Some(at) = line.find("event-processor ") else {
            return Vec::new();
        };
        let (mut words, mut word, mut quote) = (Vec::new(), String::new(), None);
        for c in line[at..].chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), c) => word.push(c),
                (None, '\'' | '"') => quote = Some(c),
                (None, '|' | '>' | '&' | '#') => break,
                (None, c) if c.is_whitespace() => {
                    if !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                }
                (None, c) => word.push(c),
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
        words
    }

    #[test]
    fn the_examples_parse() {
        for (path, text) in EXAMPLES {
            for line in text.lines() {
                let words = program_words(line);
                assert!(!words.is_empty(), "{line}");
                let parsed = command().try_get_matches_from(&words);
                assert!(
                    parsed.is_ok(),
                    "example of `{path}` does not parse: {words:?}: {}",
                    parsed.err().map(|e| e.to_string()).unwrap_or_default()
                );
            }
        }
    }
}
