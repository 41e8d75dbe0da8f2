//! `event-processor completions SHELL` and `event-processor man`, from the
//! built binary: the bash script completes subcommands and their flags in a
//! real bash, the manual pages hold every command with its examples, and
//! every command's `--help` ends with examples.

use std::process::{Command, Output};

fn binary(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_event-processor"))
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run event-processor: {err}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What bash completes for `words` (the last one being completed), with
/// the script `completions bash` printed loaded.
fn bash_completes(script: &str, words: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("temp folder");
    let path = dir.path().join("event-processor.bash");
    std::fs::write(&path, script).expect("write the script");
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cword = words.len() - 1;
    let prev = if cword > 0 { words[cword - 1] } else { "" };
    let program = format!(
        "source '{}'\nCOMP_WORDS=({})\nCOMP_CWORD={cword}\n_event__processor event-processor '{}' '{prev}'\necho \"${{COMPREPLY[*]}}\"",
        path.display(),
        quoted.join(" "),
        words[cword],
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&program)
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|err| panic!("cannot run bash: {err}"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

#[test]
fn bash_completes_commands_and_their_flags() {
    let out = binary(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let script = text(&out.stdout);
    assert_eq!(
        bash_completes(&script, &["event-processor", "dead-l"]),
        "dead-letters"
    );
    assert_eq!(
        bash_completes(&script, &["event-processor", "dead-letters", "re"]),
        "retry"
    );
    assert_eq!(
        bash_completes(&script, &["event-processor", "run", "--until"]),
        "--until-caught-up"
    );
    assert_eq!(
        bash_completes(&script, &["event-processor", "prune", "--older"]),
        "--older-than"
    );
    assert_eq!(
        bash_completes(&script, &["event-processor", "completions", "f"]),
        "fish"
    );
}

#[test]
fn every_shell_gets_a_script_and_an_unknown_one_is_a_usage_error() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = binary(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(
            script.contains("dead-letters") && script.contains("until-caught-up"),
            "{shell}: {script}"
        );
    }
    let out = binary(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with("error: invalid value 'tcsh' for '<SHELL>'"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn man_writes_a_page_per_command_with_its_examples() {
    let out = binary(&["man"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains(".TH event-processor 1"), "{page}");
    assert!(
        page.contains("event\\-processor run \\-\\-until\\-caught\\-up"),
        "{page}"
    );

    let dir = tempfile::tempdir().expect("temp folder");
    let folder = dir.path().join("man1");
    let out = binary(&["man", "--out", &folder.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    for name in [
        "event-processor.1",
        "event-processor-run.1",
        "event-processor-decode.1",
        "event-processor-dead-letters-retry.1",
        "event-processor-kafka-topics-create.1",
    ] {
        let path = folder.join(name);
        assert!(
            listed.contains(&format!("{}\n", path.display())),
            "{listed}"
        );
        let page = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(page.contains("Example"), "{name} has no example:\n{page}");
    }
    let prune = std::fs::read_to_string(folder.join("event-processor-prune.1")).unwrap_or_default();
    assert!(
        prune.contains("event\\-processor prune \\-\\-older\\-than 30d"),
        "{prune}"
    );
}

#[test]
fn man_into_a_folder_it_cannot_write_says_so_in_one_line() {
    let dir = tempfile::tempdir().expect("temp folder");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").expect("write");
    let out = binary(&["man", "--out", &file.to_string_lossy()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: cannot write the manual pages into --out {}: ",
            file.display()
        )) && stderr.ends_with("; give a folder you can write to\n"),
        "{stderr}"
    );
}

#[test]
fn every_help_ends_with_an_example() {
    for command in [
        &["migrate"][..],
        &["seed"],
        &["status"],
        &["run"],
        &["show"],
        &["decode"],
        &["relay"],
        &["kafka", "topics", "create"],
        &["dead-letters", "list"],
        &["dead-letters", "retry"],
        &["prune"],
        &["verify"],
        &["completions"],
        &["man"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let out = binary(&args);
        assert_eq!(out.status.code(), Some(0), "{command:?}");
        let help = text(&out.stdout);
        let tail = help.rsplit("\n\n").next().unwrap_or_default();
        assert!(
            tail.starts_with("Example:\n") || tail.starts_with("Examples:\n"),
            "{command:?}:\n{help}"
        );
        assert!(
            tail.contains(&format!("  event-processor {}", command.join(" "))),
            "{command:?}:\n{help}"
        );
    }
}
