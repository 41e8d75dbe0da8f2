//! The variables of the process and of its env file (`.env`, `--env-file`),
//! read in dotenvy's syntax with errors that name the file, the line and the
//! key, never a value: a value may be a password, and an unterminated quote
//! makes the parser take the rest of the file as that value.

use super::{ConfigError, EnvMap, KEYS};
use std::path::Path;

/// The variables this process sees: the `.env` file (if any) under the process
/// environment, which wins, as dotenv tools do. Only keys we know, and keys
/// with our prefixes (for the typo check), are kept.
pub fn env_map(env_file: Option<&Path>) -> Result<EnvMap, ConfigError> {
    let mut map = EnvMap::new();
    let (path, required) = match env_file {
        Some(path) => (path.to_path_buf(), true),
        None => (Path::new(".env").to_path_buf(), false),
    };
    if required || path.exists() {
        map.extend(read(&path)?);
    }
    for (key, value) in std::env::vars() {
        map.insert(key, value);
    }
    map.retain(|key, _| is_ours(key));
    Ok(map)
}

fn is_ours(key: &str) -> bool {
    KEYS.iter().any(|(k, _, _)| *k == key)
        || [
            "POSTGRES_",
            "MONGODB_",
            "KAFKA_",
            "POLL_",
            "REPLICATION_",
            "BATCH_",
            "RETRY_",
            "RELAY_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
}

/// The `KEY=value` pairs of the file, in order.
fn read(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::EnvFileRead {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text)
}

/// Parses the text of an env file called `path` (for messages).
fn parse(path: &str, text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut pairs = Vec::new();
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        match item {
            Ok(pair) => pairs.push(pair),
            Err(err) => return Err(locate(path, text, &err)),
        }
    }
    Ok(pairs)
}

/// Finds the statement that `err` is about (the first one that does not parse
/// on its own) and describes it by line number and key.
fn locate(path: &str, text: &str, err: &dotenvy::Error) -> ConfigError {
    if let dotenvy::Error::Io(source) = err {
        return ConfigError::EnvFileRead {
            path: path.to_string(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        };
    }
    // Byte offset where each line starts, and where the text ends.
    let mut starts: Vec<usize> = text
        .split_inclusive('\n')
        .scan(0, |offset, line| {
            let start = *offset;
            *offset += line.len();
            Some(start)
        })
        .collect();
    let lines = starts.len();
    starts.push(text.len());
    // A statement may span lines (a quoted value with newlines): it ends at
    // the first line after which its text parses.
    let mut first = 0;
    for last in 0..lines {
        if parses(&text[starts[first]..starts[last + 1]]) {
            first = last + 1;
        }
    }
    if first == lines {
        // Everything parses piece by piece: blame the last line.
        first = lines.saturating_sub(1);
    }
    let rest = &text[starts.get(first).copied().unwrap_or(0)..];
    let line = rest.split('\n').next().unwrap_or("");
    let key = key_of(line);
    let problem = if key.is_none() {
        "not of the form KEY=VALUE (a key is a letter or _ followed by letters, digits, _ and .)"
    } else if runs_to_the_end(rest) {
        "unterminated quote: the value runs to the end of the file (close the quote, or escape a quote inside the value with \\)"
    } else {
        "the value cannot be parsed (quote a value with spaces; the escapes are \\\\, \\', \\\", \\$, \\n)"
    };
    ConfigError::EnvFileLine {
        path: path.to_string(),
        line: first + 1,
        key,
        problem: problem.to_string(),
    }
}

fn parses(chunk: &str) -> bool {
    dotenvy::from_read_iter(chunk.as_bytes()).all(|item| item.is_ok())
}

/// Whether the statement starting `rest` is still open at the end of the
/// text: dotenvy then reports the whole remainder, at its very end.
fn runs_to_the_end(rest: &str) -> bool {
    match dotenvy::from_read_iter(rest.as_bytes()).find_map(Result::err) {
        Some(dotenvy::Error::LineParse(line, index)) => line == rest && index == rest.len(),
        _ => false,
    }
}

/// The key of a `KEY=value` (or `export KEY=value`) line, when it has one.
fn key_of(line: &str) -> Option<String> {
    let line = line.trim_start();
    let line = match line.strip_prefix("export") {
        Some(rest) if rest.starts_with(char::is_whitespace) => rest.trim_start(),
        _ => line,
    };
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(line.len());
    let key = &line[..end];
    let starts_well = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    let followed_by_equals = line[end..].trim_start().starts_with('=');
    (starts_well && followed_by_equals).then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        match parse("test.env", text) {
            Ok(pairs) => panic!("parsed: {pairs:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn values_load_as_dotenvy_reads_them() {
        let pairs = parse(
            "test.env",
            "\u{feff}# comment\nA=1\nexport B='two words'\nC=\"multi\nline\"\n\nD=x # note\n",
        )
        .expect("valid");
        let expected = [
            ("A", "1"),
            ("B", "two words"),
            ("C", "multi\nline"),
            ("D", "x"),
        ];
        assert_eq!(pairs, expected.map(|(k, v)| (k.to_string(), v.to_string())));
    }

    #[test]
    fn an_unterminated_quote_names_line_and_key_but_no_value() {
        let text = "POSTGRES_HOST=db\n\nPOSTGRES_PASSWORD=it's-S3CR3T\nMONGODB_URI=mongodb://u:M0NG0-S3CR3T@h/\n";
        let err = error_of(text);
        assert_eq!(
            err.lines().count(),
            1,
            "one line, not the rest of the file: {err}"
        );
        assert!(
            err.starts_with("env file test.env, line 3, key POSTGRES_PASSWORD: unterminated quote"),
            "{err}"
        );
        assert!(!err.contains("S3CR3T"), "{err}");
        // The last line, without a newline at the end.
        let err = error_of("A=1\nB=\"S3CR3T");
        assert!(
            err.starts_with("env file test.env, line 2, key B: unterminated quote"),
            "{err}"
        );
    }

    #[test]
    fn a_line_without_a_key_is_named_by_number_only() {
        for (text, line) in [
            ("A=1\nS3CR3T\n", 2),
            ("A='multi\nline'\nNOT A KEY=S3CR3T\n", 3),
            ("-S3CR3T=1\n", 1),
        ] {
            let err = error_of(text);
            assert!(
                err.starts_with(&format!(
                    "env file test.env, line {line}: not of the form KEY=VALUE"
                )),
                "{text:?}: {err}"
            );
            assert!(!err.contains("S3CR3T"), "{err}");
        }
    }

    #[test]
    fn a_bad_value_names_line_and_key() {
        for (text, line, key) in [
            (
                "A=1\nPOSTGRES_PASSWORD=two S3CR3T words\n",
                2,
                "POSTGRES_PASSWORD",
            ),
            (
                "export KAFKA_CONFIG=sasl.password=S3CR3T\\q\n",
                1,
                "KAFKA_CONFIG",
            ),
        ] {
            let err = error_of(text);
            assert!(
                err.starts_with(&format!(
                    "env file test.env, line {line}, key {key}: the value cannot be parsed"
                )),
                "{text:?}: {err}"
            );
            assert!(!err.contains("S3CR3T"), "{err}");
        }
    }
}
